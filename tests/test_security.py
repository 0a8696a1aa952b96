"""Security: pickled code never runs, outputs stay under their prefix, secrets never leak, the
embedded dashboard listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from media import write_video

from farm.driver import JobError, output_url, run_job
from farm.inputs import VideoInput, expand_inputs
from farm.spec import parse_spec
from farm.storage import StorageError

pytestmark = pytest.mark.timeout(300)


class _Evil:
    """Unpickling this runs ``open(marker, "w")``: the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_job_with_code_running_pickle_weights_is_refused(ray_session, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    evil = tmp_path / "rvm.pth"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, evil)
    video = write_video(tmp_path / "clip.mp4", 8)
    job = {
        "name": "evil-weights",
        "inputs": [video],
        "model": {"name": "rvm", "weights": str(evil), "device": "cpu"},
        "output": {"uri": str(tmp_path / "out/{stem}_{channel}"), "format": "png"},
        "retries": 0,
    }
    with pytest.raises(JobError) as err:
        run_job(parse_spec(yaml.safe_dump(job), "evil.yaml"))
    msg = str(err.value)
    assert "\n" not in msg and "refusing to load" in msg and str(evil) in msg, msg
    assert not marker.exists()  # nothing in the pickle ran, in any actor


SPEC = parse_spec(yaml.safe_dump({"name": "j", "inputs": ["x.mp4"], "output": {"uri": "s3://b/out/{stem}_{channel}.{ext}"}}))


@pytest.mark.parametrize("stem", ["../../evil", "x/../../../evil", "/etc/passwd", "s3://other-bucket/x", "c:\\x"])
def test_crafted_stems_cannot_leave_the_output_prefix(stem: str) -> None:
    """output_url is the last gate (stems from expand_inputs are already sanitised): it refuses escapes."""
    assert output_url(SPEC, VideoInput(url="x.mp4", stem="clip", key="k"), "alpha") == "s3://b/out/clip_alpha.mp4"
    with pytest.raises(StorageError, match="refused"):
        output_url(SPEC, VideoInput(url="x.mp4", stem=stem, key="k"), "alpha")


def test_crafted_input_names_render_inside_the_prefix(ray_session, tmp_path) -> None:
    """Inputs named ``..evil.mp4``, ``..mp4`` and with spaces render to keys under the output folder."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["..evil.mp4", "..mp4", "my clip (1).mp4"]
    for n in names:
        write_video(src / n, 4)
    videos, _ = expand_inputs([str(src / "*.mp4")])
    assert all("/" not in v.stem and ".." not in v.stem and v.stem for v in videos)
    out = tmp_path / "sub" / "out"
    job = {
        "name": "crafted",
        "inputs": [str(src / "*.mp4")],
        "model": {"name": "synthetic"},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png"},
    }
    result = run_job(parse_spec(yaml.safe_dump(job), "crafted.yaml"))
    assert result.ok, result.manifest
    for v in result.manifest["videos"].values():
        url = Path(v["outputs"]["alpha"]["url"]).resolve()
        assert url.parent == out.resolve(), url
    outside = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out) and not p.is_relative_to(src)}
    assert outside == {tmp_path / "sub"}  # nothing written anywhere else


@pytest.mark.slow
def test_credentials_never_leak(s3, tmp_path) -> None:
    """A job on S3 (with a failing input and retried faults) through the CLI: neither the storage secret
    nor an AWS secret from the environment appears in any ledger object, the manifest, or the output."""
    import fsspec

    bucket = s3.make_bucket()
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.put(write_video(tmp_path / "clip.mp4", 20), f"{bucket}/in/clip.mp4")
    env_secret = "envsecret-" + uuid.uuid4().hex
    job = {
        "name": "creds",
        "inputs": [f"{bucket}/in/clip.mp4", f"{bucket}/in/missing.mp4"],
        "model": {"name": "synthetic", "params": {"fail_on_actor": 0}},  # actor 0 fails: retries, error lines
        "window": {"frames": 8},
        "output": {"uri": f"{bucket}/out/{{stem}}_{{channel}}", "format": "png"},
        "resources": {"actors": 2},
        "storage_options": s3.storage_options,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": env_secret, "AWS_ACCESS_KEY_ID": "farm-env-key"}
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "submit", "--json", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-2000:]  # the missing input fails
    assert "missing.mp4" in text and "Traceback" not in text
    objects = fs.find(f"{bucket}/out")
    assert any(o.endswith("manifest.json") for o in objects)
    for o in objects:
        data = fs.cat(o)
        assert s3.secret.encode() not in data and env_secret.encode() not in data, o
    assert s3.secret not in text and env_secret not in text


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


@pytest.mark.slow
def test_embedded_dashboard_listens_on_localhost_only(tmp_path) -> None:
    """``ensure_ray`` (what ``farm submit`` uses) starts the dashboard on 127.0.0.1, not on the node's
    address, where anyone on the network could submit jobs through it."""
    code = (
        "from farm.driver import ensure_ray\n"
        "ensure_ray(num_cpus=1)\n"
        "import ray, sys, time\n"
        "n = ray._private.worker.global_worker.node\n"
        "print(n.address_info['webui_url'], n.node_ip_address, flush=True)\n"
        "sys.stdin.read()\n"  # stay up until the test has probed
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline().split()
        assert len(line) == 2, line
        webui, node_ip = line
        host, port = webui.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert _listening("127.0.0.1", int(port))
        if node_ip not in ("127.0.0.1", "localhost"):
            assert not _listening(node_ip, int(port))  # not reachable from the machine's network address
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
