"""The scheduler under failure, on a real local Ray: dead, hung, failing and slow actors, lost frames,
the failure budget and the memory budget. Faults come from the synthetic model's own parameters (and
``ray.kill`` / SIGSTOP on real actor processes); every assertion is on outputs and the event log, never
on time."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import yaml
from watched import run_watched

from farm.driver import JobError, JobRunner, absolute_local_paths
from farm.sample import write_sample
from farm.spec import parse_spec
from farm.video import probe, read_frames

FRAMES = 48  # 6 shards of 8


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("sched")
    video, _ = write_sample(str(d / "clip.mp4"), frames=FRAMES, width=64, height=48, seed=5)
    return video


def job(clip: str, out: Path, actors: int = 2, params: dict | None = None, **top: Any) -> dict:
    return {
        "name": "sched",
        "inputs": [clip] if isinstance(clip, str) else clip,
        "model": {"name": "synthetic", "params": params or {}},
        "window": {"frames": 8},
        "output": {"uri": str(out / "{job}/{stem}_{channel}.{ext}"), "channels": ["alpha"], "format": "mp4"},
        "resources": {"actors": actors},
        **top,
    }


def run(job_dict: dict, on_event=None) -> tuple[Any, list[dict], JobRunner]:
    """Run a job in this thread, the whole pool loaded before faults hit given actors (``run_watched``)."""
    result, runner = run_watched(job_dict, on_event)
    return result, runner.events, runner


def alpha(result) -> np.ndarray:
    (entry,) = result.manifest["videos"].values()
    url = entry["outputs"]["alpha"]["url"]
    return np.stack(list(read_frames(url, 0, probe(url).frame_count)))


def assert_same_frames(got: np.ndarray, want: np.ndarray, events: list[dict]) -> None:
    """Frame-exact equality; on failure, name the frames that differ and show the run's events."""
    assert got.shape == want.shape
    bad = [int(i) for i in np.flatnonzero((got != want).any(axis=(1, 2, 3)))]
    trail = [(e["event"], e.get("actor"), e.get("shard"), e.get("attempt")) for e in events]
    assert not bad, f"frames {bad} differ from the fault-free run; events: {trail}"


def of(events: list[dict], kind: str, **match: Any) -> list[dict]:
    return [e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def reference(ray_session, clip, tmp_path_factory) -> np.ndarray:
    """The output of a run where nothing goes wrong: every faulty run must give exactly this."""
    result, events, _ = run(job(clip, tmp_path_factory.mktemp("ref")))
    assert result.ok, result.manifest
    frames = alpha(result)
    assert len(frames) == FRAMES
    assert not of(events, "actor_replaced") and not of(events, "shard_failed")
    return frames


def test_dead_actors_are_replaced_and_their_shard_redispatched(ray_session, clip, reference, tmp_path):
    """Actor 1 is killed while idle (before any shard), actor 0 with its first shard in flight."""
    killed: dict[str, Any] = {}

    def on_event(runner, kind, data):
        if kind == "actor_ready" and data["actor"] == 1:
            ray.kill(runner.actors[1])
        if kind == "shard_dispatched" and data["actor"] == 0 and "mid" not in killed:
            killed["mid"] = (data["video"], data["shard"])
            ray.kill(runner.actors[0])

    result, events, runner = run(job(clip, tmp_path, params={"sleep_per_frame": 0.01}), on_event)
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    assert of(events, "actor_replaced", actor=0) and of(events, "actor_replaced", actor=1)
    video, shard = killed["mid"]
    redispatched = of(events, "shard_dispatched", video=video, shard=shard)
    assert len(redispatched) >= 2 and redispatched[-1]["attempt"] >= 2
    done = of(events, "shard_done", video=video, shard=shard)
    assert len(done) == 1
    # The event log is persisted in the ledger.
    saved = json.loads((Path(runner.ledger.root) / "events.json").read_text())
    assert [e["event"] for e in saved] == [e["event"] for e in events]


def test_failing_actor_is_blocklisted_and_the_job_finishes_on_the_others(ray_session, clip, reference, tmp_path):
    result, events, _ = run(job(clip, tmp_path, params={"fail_on_actor": 1}))
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    (bl,) = of(events, "actor_blocklisted", actor=1)
    failed = of(events, "shard_failed", actor=1)
    assert bl["failures"] == 3 and len([f for f in failed if "InjectedFault" in f["error"]]) == 3
    # with shards_per_actor 2 a shard may have the model when the actor is killed: it died with it, and ran again
    assert all("InjectedFault" in f["error"] or "ActorDiedError" in f["error"] for f in failed) and len(failed) <= 4
    after = events[events.index(bl) :]
    assert not of(after, "shard_dispatched", actor=1), "a blocklisted actor got another shard"


def test_job_fails_clearly_when_no_healthy_actor_remains(ray_session, clip, tmp_path):
    j = job(clip, tmp_path, actors=1, params={"fail_on_actor": 0}, retries=5, scheduler={"blocklist_after": 2})
    result, events, _ = run(j)
    assert not result.ok
    (entry,) = result.manifest["videos"].values()
    assert "no healthy actor left" in entry["error"] and "blocklisted after 2 failed shards" in entry["error"]
    failed = of(events, "shard_failed")
    assert len([f for f in failed if "InjectedFault" in f["error"]]) == 2  # and the shard it held when killed
    assert all("InjectedFault" in f["error"] or "ActorDiedError" in f["error"] for f in failed) and len(failed) <= 3


def test_hung_actor_is_killed_and_replaced(ray_session, clip, reference, tmp_path):
    """SIGSTOP freezes actor 0 mid-shard: no ping answer within heartbeat_s, so it is killed and replaced."""
    pids: dict[int, int] = {}
    stopped: list[int] = []

    def on_event(runner, kind, data):
        if kind == "actor_ready":
            pids[data["actor"]] = data["pid"]
        if kind == "shard_dispatched" and data["actor"] == 0 and 0 in pids and not stopped:
            stopped.append(pids[0])
            os.kill(pids[0], signal.SIGSTOP)

    j = job(clip, tmp_path, params={"sleep_per_frame": 0.01}, scheduler={"heartbeat_s": 1.0, "speculative": False})
    try:
        result, events, _ = run(j, on_event)
    finally:
        for pid in stopped:  # never leave a frozen process behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    (h,) = of(events, "actor_hung", actor=0)
    assert "no heartbeat" in h["reason"]
    assert of(events, "actor_replaced", actor=0)
    assert len(of(events, "shard_dispatched", video=h["video"], shard=h["shard"])) == 2


def test_stalled_render_call_is_hung(ray_session, clip, reference, tmp_path):
    """Actor 0 answers pings but one render call never ends (1000x slower): past stall_s it is hung."""
    params = {"sleep_per_frame": 0.01, "slow_actor": 0, "slow_factor": 1000}
    j = job(clip, tmp_path, params=params, scheduler={"stall_s": 1.0, "speculative": False})
    result, events, _ = run(j)
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    hung = of(events, "actor_hung", actor=0)
    assert hung and all("render call" in h["reason"] for h in hung)


def test_straggler_copy_wins(ray_session, clip, reference, tmp_path):
    """Actor 0 is 20x slower: at the tail its shard is copied to idle actor 1, whose result wins."""
    params = {"sleep_per_frame": 0.02, "slow_actor": 0, "slow_factor": 20}
    result, events, _ = run(job(clip, tmp_path, params=params))
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    (copy,) = of(events, "shard_speculated")
    assert copy["actor"] == 1
    key = {"video": copy["video"], "shard": copy["shard"]}
    (done,) = of(events, "shard_done", **key)
    assert done["actor"] == 1
    (cancelled,) = of(events, "shard_cancelled", reason="another copy finished first", **key)
    assert cancelled["actor"] == 0


def test_cancelled_copy_stops_before_the_actors_are_killed(ray_session, clip, tmp_path):
    """png frames go straight to their final keys, so the losing copy of a speculated shard must have
    stopped writing before the job kills its actors (else a frame's temporary is cut off halfway and
    stays in the output folder): every cancelled copy acknowledges its abort, and the folder holds
    the frames and nothing else."""
    j = job(clip, tmp_path, params={"sleep_per_frame": 0.02, "slow_actor": 0, "slow_factor": 20})
    j["output"].update(format="png", uri=str(tmp_path / "{job}/{stem}_{channel}"))
    result, events, _ = run(j)
    assert result.ok, result.manifest
    cancelled = [(e["video"], e["shard"]) for e in of(events, "shard_cancelled")]
    assert cancelled, "no copy was made: the test shows nothing"
    assert [(e["video"], e["shard"]) for e in of(events, "copy_stopped")] == cancelled
    (entry,) = result.manifest["videos"].values()
    folder = Path(entry["outputs"]["alpha"]["url"])
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(FRAMES)]


def test_no_copies_when_speculation_is_off(ray_session, clip, reference, tmp_path):
    params = {"sleep_per_frame": 0.005, "slow_actor": 0, "slow_factor": 20}
    result, events, _ = run(job(clip, tmp_path, params=params, scheduler={"speculative": False}))
    assert result.ok and not of(events, "shard_speculated")
    assert not of(events, "shard_cancelled", reason="another copy finished first")


def test_small_tasks_run_on_the_jobs_warm_assembler(ray_session):
    """Blends and commits go to one assembler actor started with the pool: the same process every time
    (its imports done), not a fresh Ray worker per task."""
    from farm.pool import Done, Pool
    from farm.worker import ModelConfig

    pool = Pool("assembler-test", ModelConfig("synthetic"), None, {}, retries=1)
    pool.start(0)  # no model actors: the assembler alone
    try:
        for attempt in (1, 2):
            pool.run_task(attempt, os.getpid, name=f"assembler-test/video/commit-{attempt}")
        done: list = []
        while len(done) < 2:
            done += pool.wait(30)
        assert all(isinstance(d, Done) for d in done)
        pids = {d.value for d in done}
        assert pids == {ray.get(pool.assembler.run.remote(os.getpid))} and os.getpid() not in pids
    finally:
        pool.shutdown()


def test_a_videos_seconds_run_from_its_first_dispatch_to_its_commit(ray_session, clip, tmp_path):
    """The model's load is the job's time, not the video's (the report's fps is a render speed)."""
    j = job(clip, tmp_path)
    j["window"]["overlap"] = 2  # blends as well
    result, events, _ = run(j)
    assert result.ok, result.manifest
    assert of(events, "seam_measured")
    (entry,) = result.manifest["videos"].values()
    first = min(e["t"] for e in of(events, "shard_dispatched"))
    (done,) = of(events, "video_done")
    assert abs(entry["seconds"] - (done["t"] - first)) < 0.25


def test_lost_frame_is_detected_and_retried(ray_session, clip, reference, tmp_path):
    marker = tmp_path / "drop-one-frame"
    marker.touch()
    result, events, _ = run(job(clip, tmp_path, params={"drop_frame_marker": str(marker)}))
    assert not marker.exists(), "the fault was never injected"
    assert result.ok, result.manifest
    (failed,) = of(events, "shard_failed")
    assert "the plan says 8" in failed["error"]
    assert_same_frames(alpha(result), reference, events)


def test_lost_overlap_frame_is_detected_and_retried(ray_session, clip, tmp_path):
    """The model drops the last frame of shard 0, which lies in its tail overlap (its core is whole): the
    shard fails and is retried, instead of the blend failing the whole video."""
    marker = tmp_path / "drop-one-frame"
    marker.touch()
    j = job(clip, tmp_path, actors=1, params={"drop_frame_marker": str(marker)}, window={"frames": 12, "overlap": 2})
    j["output"]["format"] = "png"
    result, events, _ = run(j)
    assert not marker.exists(), "the fault was never injected"
    assert result.ok, result.manifest
    (failed,) = of(events, "shard_failed")
    assert "tail overlap has 1 frames, the plan says 2" in failed["error"], failed
    from PIL import Image

    (entry,) = result.manifest["videos"].values()
    pngs = sorted(Path(entry["outputs"]["alpha"]["url"]).glob("*.png"))
    got = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(int)
    src = np.stack(list(read_frames(clip, 0, FRAMES))).astype(np.float32)
    want = np.rint((1 - src / 255).mean(axis=-1) * 255).astype(int)  # the synthetic model's alpha
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_failure_budget_stops_scheduling(ray_session, clip, tmp_path):
    second = tmp_path / "second.mp4"
    shutil.copy(clip, second)
    params = {"fail_on_actor": 0}
    j = job([clip, str(second)], tmp_path, actors=1, params=params, retries=0, max_failed_shards=0,
            scheduler={"shards_per_actor": 1})  # one dispatch to count: none follows the failure
    result, events, _ = run(j)
    assert len(of(events, "shard_dispatched")) == 1  # without the budget, the other video's shards would run
    errors = sorted(v["error"] for v in result.manifest["videos"].values())
    assert any("max_failed_shards=0 exhausted" in e for e in errors)
    assert any("always fails" in e for e in errors)


def test_model_over_memory_budget_refuses_to_start(ray_session, clip, tmp_path):
    j = job(clip, tmp_path, params={"memory_bytes": 2 * 2**30}, resources={"actors": 2, "gpu_memory_gb": 1})
    spec = absolute_local_paths(parse_spec(yaml.safe_dump(j), "test.yaml"))
    runner = JobRunner(spec)
    with pytest.raises(JobError, match=r"does not fit the per-actor memory budget of 1.0 GiB on any of 2 actors"):
        runner.run()
    saved = json.loads((Path(runner.ledger.root) / "events.json").read_text())
    assert len([e for e in saved if e["event"] == "actor_refused"]) == 2


def sigkill_mid_render(runner: JobRunner, slot: int, pid: int, done: dict[str, Any]) -> None:
    """SIGKILL actor ``slot``'s process once its ping says a render call is running (not before, not after)."""
    import threading
    import time

    actor = runner.actors[slot]

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                beat = ray.get(actor.ping.remote(), timeout=10)
            except ray.exceptions.RayError:
                return
            if beat["call_s"] > 0:
                os.kill(pid, signal.SIGKILL)
                done["killed"] = pid
                return
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def test_sigkilled_actor_mid_shard_is_replaced(ray_session, clip, reference, tmp_path):
    """The process of actor 0 is SIGKILLed in the middle of its first shard's render call."""
    pids: dict[int, int] = {}
    killed: dict[str, Any] = {}

    def on_event(runner, kind, data):
        if kind == "actor_ready":
            pids[data["actor"]] = data["pid"]
        if kind == "shard_dispatched" and data["actor"] == 0 and "shard" not in killed:
            killed.update(video=data["video"], shard=data["shard"])
            sigkill_mid_render(runner, 0, pids[0], killed)

    result, events, _ = run(job(clip, tmp_path, params={"sleep_per_frame": 0.05}), on_event)
    assert killed.get("killed") == pids[0], "the actor was not killed mid-render"
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    assert of(events, "actor_replaced", actor=0)
    key = {"video": killed["video"], "shard": killed["shard"]}
    (failed,) = of(events, "shard_failed", **key)
    assert failed["actor"] == 0 and failed["attempt"] == 1
    assert of(events, "shard_dispatched", **key)[-1]["attempt"] == 2 and len(of(events, "shard_done", **key)) == 1


def test_sigkilled_actor_mid_handoff_chain_resumes_from_handed_off_state(ray_session, clip, reference, tmp_path):
    """A handoff chain (the synthetic state counts frames): the actor rendering shard 2 is SIGKILLed mid-render.
    Shard 2 is rendered again from shard 1's handed-off state, not from a cold start: the states in the
    ledger count every frame exactly once (8, 16, 24, ...), and the output equals the fault-free run."""
    pids: dict[int, int] = {}
    killed: dict[str, Any] = {}

    def on_event(runner, kind, data):
        if kind == "actor_ready":
            pids[data["actor"]] = data["pid"]
        if kind == "shard_dispatched" and data["shard"] == 2 and "shard" not in killed:
            killed.update(video=data["video"], shard=2, actor=data["actor"])
            sigkill_mid_render(runner, data["actor"], pids[data["actor"]], killed)

    j = job(clip, tmp_path, params={"sleep_per_frame": 0.05}, window={"frames": 8, "state": "handoff"})
    result, events, runner = run(j, on_event)
    assert "killed" in killed, "the actor was not killed mid-render"
    assert result.ok, result.manifest
    assert_same_frames(alpha(result), reference, events)
    key = {"video": killed["video"], "shard": 2}
    assert of(events, "shard_failed", **key) and of(events, "actor_replaced", actor=killed["actor"])
    assert [e["attempt"] for e in of(events, "shard_dispatched", **key)] == [1, 2]
    assert len(of(events, "shard_done", **key)) == 1
    states = sorted(Path(runner.ledger.root).glob("state/*/*.npz"))
    assert [int(np.load(p)["frames"][0]) for p in states] == [8, 16, 24, 32, 40]  # after shards 0..4
