"""Faults survived: each run is compared with a fault-free run of the same job (synthetic model, PNG
outputs, so frames compare exactly): none lost, none duplicated, none different."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from media import write_video

from farm.driver import run_job
from farm.spec import parse_spec

pytestmark = pytest.mark.timeout(400)


def job(inputs: list[str], uri: str, *, params: dict | None = None, frames: int = 16, actors: int = 2, **extra) -> dict:
    j = {
        "name": "faults",
        "inputs": inputs,
        "model": {"name": "synthetic", "params": params or {}},
        "window": {"frames": frames},
        "output": {"uri": uri, "format": "png", "channels": ["alpha", "fgr"]},
        "resources": {"actors": actors},
        "retries": 2,
    }
    j.update(extra)
    return j


def render(j: dict):
    return run_job(parse_spec(yaml.safe_dump(j), "faults.yaml"))


def pngs(folder: str | Path, storage_options: dict | None = None) -> list[bytes]:
    """Every frame of a PNG sequence (bytes: PNG encoding is deterministic for equal pixels)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(folder), **(storage_options or {}))
    names = sorted(fs.find(path))
    assert all(p.endswith(".png") and not p.rsplit("/", 1)[1].startswith(".") for p in names), names
    return [fs.cat_file(p) for p in names]


def outputs_of(result, storage_options: dict | None = None) -> dict[str, dict[str, list[bytes]]]:
    return {
        v["url"]: {ch: pngs(o["url"], storage_options) for ch, o in v["outputs"].items()}
        for v in result.manifest["videos"].values()
    }


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("clips")
    return [write_video(d / "a.mp4", 40), write_video(d / "b.mp4", 24, (48, 32))]


@pytest.fixture(scope="module")
def reference(ray_session, clips, tmp_path_factory):
    """The fault-free run every fault test compares with."""
    out = tmp_path_factory.mktemp("ref")
    result = render(job(clips, str(out / "{stem}_{channel}")))
    assert result.ok
    ref = outputs_of(result)
    assert [len(ref[c]["alpha"]) for c in clips] == [40, 24]
    return ref


def test_out_of_memory_halves_the_batch(ray_session, clips, reference, tmp_path) -> None:
    """A render call over 4 frames raises torch's OutOfMemoryError: the worker halves the batch (16 -> 8
    -> 4) and goes on from the state before the failed call; the outputs are those of the fault-free run."""
    result = render(job(clips, str(tmp_path / "{stem}_{channel}"), params={"oom_above": 4}))
    assert result.ok, result.manifest
    assert outputs_of(result) == reference
    records = list((tmp_path / ".farm").rglob("shards/*/*.json"))
    assert records and all(json.loads(r.read_text()).get("oom_splits") for r in records)
    assert {s for r in records for s in json.loads(r.read_text())["oom_splits"]} == {16, 8}


def test_out_of_memory_keeps_the_handoff_state(ray_session, clips, tmp_path) -> None:
    """With a handed-off state (the synthetic model counts frames in it), splitting a call must not
    lose or repeat any frame's contribution to the state: the chain's final count is the frame count."""
    j = job(clips[:1], str(tmp_path / "{stem}_{channel}"), params={"oom_above": 3}, window={"frames": 16,
            "state": "handoff"})
    result = render(j)
    assert result.ok, result.manifest
    states = sorted((tmp_path / ".farm").rglob("state/*/*.npz"))
    counts = [int(np.load(p)["frames"][0]) for p in states]
    assert counts == [16, 32]  # state handed off after shards 0 and 1: every frame counted exactly once


def test_one_frame_that_does_not_fit_fails_with_the_error(ray_session, clips, tmp_path) -> None:
    """oom_above=0: even one frame is too many; after the retries the video fails, with the reason."""
    result = render(job(clips[:1], str(tmp_path / "{stem}_{channel}"), params={"oom_above": 0}, retries=1))
    (v,) = result.manifest["videos"].values()
    assert v["status"] == "failed" and "OutOfMemoryError" in v["error"] and "\n" not in v["error"], v["error"]


def test_failing_actor_is_retried_elsewhere(ray_session, clips, reference, tmp_path) -> None:
    """Actor 0 raises on every shard: each shard it took is retried on actor 1; the output is exact."""
    result = render(job(clips, str(tmp_path / "{stem}_{channel}"), params={"fail_on_actor": 0}))
    assert result.ok, result.manifest
    assert outputs_of(result) == reference


def test_persistent_fault_fails_after_retries(ray_session, clips, tmp_path) -> None:
    """A fault that never clears: each video fails after ``retries`` with the model's error, on one line."""
    marker = tmp_path / "fault"
    marker.write_text("on")
    result = render(job(clips, str(tmp_path / "{stem}_{channel}"), params={"fail_marker": str(marker)}, retries=1))
    errors = []
    for v in result.manifest["videos"].values():
        assert v["status"] == "failed"
        assert v["error"].startswith(v["url"] + ": ") and "\n" not in v["error"], v["error"]
        errors.append(v["error"])
    # the first video to exhaust its retries carries the model's error; later ones may instead find every
    # actor blocklisted (3 failures each) and say so
    assert any("fault marker" in e for e in errors), errors
    assert not list(tmp_path.glob("*_alpha"))  # nothing committed


@pytest.mark.slow
def test_s3_outage_mid_job(ray_session, s3, clips, reference, tmp_path) -> None:
    """S3 goes away for 4 s while shards upload: storage retries (backoff ~15 s in all) ride it out,
    and the outputs equal the fault-free run."""
    import fsspec

    bucket = s3.make_bucket()
    fs = fsspec.filesystem("s3", **s3.storage_options)
    j = job(clips, f"{bucket}/out/{{stem}}_{{channel}}", params={"sleep_per_frame": 0.02}, frames=8,
            storage_options=s3.storage_options)
    outage: dict[str, float] = {}

    def take_s3_away() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if fs.find(f"{bucket}/out/.farm", maxdepth=None) and any(
                    "/parts/" in p or "/shards/" in p for p in fs.find(f"{bucket}/out/.farm")
                ):
                    break
            except Exception:
                pass
            time.sleep(0.05)
        outage["stop"] = time.time()
        s3.stop()
        time.sleep(4)
        s3.start()
        outage["start"] = time.time()

    t = threading.Thread(target=take_s3_away)
    t.start()
    try:
        result = render(j)
    finally:
        t.join()
        s3.start()
    assert "stop" in outage and "start" in outage
    assert result.ok, result.manifest
    # the outage came before the end: the job was mid-flight when S3 went away
    assert outage["stop"] < result.manifest["started"] + result.manifest["seconds"]
    assert outputs_of(result, s3.storage_options) == {
        url: chans for url, chans in reference.items()
    }


def shard_records(out: Path) -> list[Path]:
    """Finished-shard records; a kill may leave hidden temporaries (``.farm-tmp-*``) beside them."""
    return [p for p in out.glob(".farm/*/shards/*/*.json") if not p.name.startswith(".")]


# The driver of the first run: run_job (what `farm submit` calls) with every event appended to a file as it
# happens, so the test knows which shards were in flight when the process was killed.
DRIVER = """
import json, os, sys
import yaml
from farm.driver import run_job
from farm.spec import parse_spec
log = open(sys.argv[2], "a")
def progress(kind, data):
    log.write(json.dumps({**data, "kind": kind}, default=str) + "\\n")
    log.flush()
path = sys.argv[1]
run_job(parse_spec(open(path).read(), path), progress=progress)
"""


@pytest.mark.slow
def test_killed_driver_resumes_without_redoing_finished_shards(clips, reference, tmp_path) -> None:
    """The driver process is SIGKILLed mid-job, then ``farm resume`` finishes it: the output equals the
    fault-free run, no finished shard is rendered again, and the shards dispatched twice are exactly those
    that were in flight at the kill (at most ``shards_per_actor`` = 2 per actor: one rendering, one queued).
    Finished shards come from the ledger's records, what the resumed run rendered from its events.json."""
    actors = 2
    out = tmp_path / "out"
    j = job(clips, str(out / "{stem}_{channel}"), params={"sleep_per_frame": 0.05}, frames=8, actors=actors)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(j))
    trace = tmp_path / "first-run-events.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(path), str(trace)], cwd=tmp_path,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if len(shard_records(out)) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, actors and all
    proc.wait(timeout=60)
    killed_at = time.time()
    done_before = {p: p.stat().st_mtime for p in shard_records(out)}
    total = 5 + 3  # shards of 8 frames: 40 -> 5, 24 -> 3
    assert 3 <= len(done_before) < total, "the job was not killed mid-way"

    def key(record: Path) -> tuple[str, int]:
        shard = json.loads(record.read_text())["shard"]
        return shard["video"], shard["index"]

    finished = {key(p) for p in done_before}
    first = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    started = {(e["video"], e["shard"]) for e in first if e["kind"] in ("shard_dispatched", "shard_speculated")}
    in_flight = started - finished  # dispatched by the killed driver and never recorded as done
    assert finished <= started and 1 <= len(in_flight) <= 2 * actors, (finished, started)

    again = subprocess.run([sys.executable, "-m", "farm.cli", "resume", "--quiet", str(path)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    records = shard_records(out)
    assert len(records) == total
    redone = [p for p in records if p in done_before and p.stat().st_mtime > killed_at]
    assert not redone, redone  # finished shards were not rendered again
    ledger = next(out.glob(".farm/*"))
    resumed = json.loads((ledger / "events.json").read_text())  # the resumed run's event log, in the ledger
    dispatched = [(e["video"], e["shard"]) for e in resumed if e["event"] == "shard_dispatched"]
    assert sorted(dispatched) == sorted(key(p) for p in records if p not in done_before)  # each once
    assert not finished & set(dispatched)
    rendered_twice = started & set(dispatched)
    assert rendered_twice == in_flight and len(rendered_twice) <= 2 * actors
    manifest = json.loads((ledger / "manifest.json").read_text())
    assert all(v["status"] == "succeeded" for v in manifest["videos"].values())
    got = {v["url"]: {ch: pngs(o["url"]) for ch, o in v["outputs"].items()} for v in manifest["videos"].values()}
    assert got == reference
