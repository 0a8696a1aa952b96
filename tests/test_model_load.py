"""A model that cannot load stops the job with one line naming the weights (or field) and the reason.

The actor catches its own failed load and reports it through ``info()``: nothing escapes ``__init__`` into
Ray's creation task (which would print a traceback, a SIGABRT and a C++ stack on the driver). The details
stay in the ledger's events (``actor_refused`` with ``detail``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farm.driver import JobError, JobRunner, absolute_local_paths
from farm.sample import write_sample
from farm.spec import parse_spec

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRAINED = SHARED / "weights" / "rvm_mobilenetv3.pth"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    video, _ = write_sample(str(tmp_path_factory.mktemp("load") / "clip.mp4"), frames=8, width=64, height=48)
    return video


def rvm_job(clip: str, out: Path, weights: str, params: dict | None = None) -> dict:
    return {
        "name": "load",
        "inputs": [clip],
        "model": {"name": "rvm", "weights": weights, "device": "cpu", "params": params or {}},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": 2},
        "retries": 0,
    }


def random_bytes(path: Path) -> str:
    path.write_bytes(os.urandom(4096))
    return str(path)


CASES = {
    "not a checkpoint": (lambda d: random_bytes(d / "model.pth"), None, "not a PyTorch checkpoint"),
    "unknown format": (lambda d: random_bytes(d / "model.weights"), None, "unknown weights format"),
    "missing file": (lambda d: str(d / "nope.pth"), None, "weights file not found"),
    "sha256 mismatch": (lambda d: f"file://{TRAINED}#sha256={'0' * 64}", None, "sha256 mismatch"),
    "params that fail at load": (lambda d: str(TRAINED), {"variant": "resnet50"}, "do not fit the resnet50 layout"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_failed_load_is_one_line_and_the_details_are_in_the_ledger(ray_session, clip, tmp_path, case) -> None:
    make, params, reason = CASES[case]
    if case in ("sha256 mismatch", "params that fail at load"):
        if not TRAINED.exists():
            pytest.skip("../shared/weights/rvm_mobilenetv3.pth is not here")
    weights = make(tmp_path)
    spec = absolute_local_paths(parse_spec(yaml.safe_dump(rvm_job(clip, tmp_path / "out", weights, params)), "j.yaml"))
    runner = JobRunner(spec)
    with pytest.raises(JobError) as err:
        runner.run()
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert msg.startswith("model 'rvm' did not load on any actor: "), msg
    assert reason in msg, msg
    path = weights.split("#")[0].removeprefix("file://")
    assert path in msg or (case == "params that fail at load" and "model.weights" in msg), msg
    events = json.loads((Path(runner.ledger.root) / "events.json").read_text())
    refused = [e for e in events if e["event"] == "actor_refused"]
    assert len(refused) == 2, events  # both actors reported, neither crashed
    assert all(e["error"] and "\n" not in e["error"] for e in refused)
    assert all("Traceback" in (e.get("detail") or "") for e in refused), refused
    assert not any(e["event"] == "actor_ready" for e in events)


@pytest.mark.slow
def test_cli_prints_one_line_for_weights_that_are_not_a_checkpoint(clip, tmp_path) -> None:
    """``farm submit`` with 4 KB of random bytes as the weights: exit 1 and farm's one line, no crash dump."""
    weights = random_bytes(tmp_path / "model.weights")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(rvm_job(clip, tmp_path / "out", weights)))
    proc = subprocess.run([sys.executable, "-m", "farm.cli", "submit", "--quiet", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Token authentication is enabled" not in ln]
    assert lines == [f"farm: model 'rvm' did not load on any actor: {weights}: unknown weights format '.weights' "
                     "(expected .safetensors, .pth, .pt, .ckpt, .bin or .onnx)"], proc.stderr[-3000:]
