"""Checkpointing a shard, in process (no Ray): an actor asked to ``checkpoint`` stops at its next chunk boundary
inside the core with a partial record (core frames so far, heads, the state there), and the attempt that continues
from that frame writes the rest; the output and the state handed down the chain equal one uninterrupted render's,
byte for byte (synthetic model with a running-count state, and RVM with tiny random weights)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from media import write_video
from test_pipeline import RVM_WEIGHTS, task_for

from farm.grid import render_ranges
from farm.ledger import Ledger, ShardRecord, core_pieces
from farm.plan import plan_shards
from farm.sinks import SinkError
from farm.worker import ModelConfig, ModelWorker, ShardTask

FRAMES = 40


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return write_video(tmp_path_factory.mktemp("ckpt") / "clip.mp4", FRAMES, (64, 48))


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def worker_for(model: str) -> ModelWorker:
    if model == "rvm":
        if not RVM_WEIGHTS.exists():
            pytest.skip("../shared reference weights are absent")
        return ModelWorker(ModelConfig("rvm", {"downsample_ratio": 0.5}, str(RVM_WEIGHTS)))
    return ModelWorker(ModelConfig("synthetic"))


def chain(worker: ModelWorker, clip: str, out: Path, checkpoint: int | None = None) -> tuple[list, list]:
    """A handoff chain of two 20-frame shards in chunks of 8; shard ``checkpoint`` is asked to checkpoint before it
    starts (so it stops at its first boundary inside the core) and is continued from there. The records (shard
    ``checkpoint``'s joined) and the states handed on."""
    shards = plan_shards("clip", FRAMES, 20)
    state, records, states = None, [], []
    for i, s in enumerate(shards):
        task = task_for(clip, out, s, chunk=8, handoff_at=shards[i + 1].start if i + 1 < len(shards) else None)
        if i == checkpoint:
            worker.checkpoint(task.name + task.tag)
            partial, none = worker.render_shard(task, None, state)
            partial = ShardRecord.from_dict(partial)
            assert none is None and partial.stopped_at == s.start + 8 and partial.state_url
            assert [p["frames"] for p in core_pieces(partial.channels["alpha"])] == [8]
            resumed = replace(task, resume_from=partial.stopped_at, state_url=partial.state_url)
            rest, state = worker.render_shard(resumed, None, None)
            record = partial.join(ShardRecord.from_dict(rest))
            assert record.stopped_at is None and record.rendered_frames == s.frames  # nothing rendered twice
        else:
            rest, state = worker.render_shard(task, None, state)
            record = ShardRecord.from_dict(rest)
        records.append(record)
        states.append(state)
    return records, states


@pytest.mark.parametrize("model", ["synthetic", "rvm"])
def test_checkpoint_then_continuation_equals_one_render(model, clip, tmp_path):
    worker = worker_for(model)
    ref_records, ref_states = chain(worker, clip, tmp_path / "ref")
    for checkpoint in (0, 1):
        out = tmp_path / f"ckpt{checkpoint}"
        records, states = chain(worker, clip, out, checkpoint)
        assert pngs(out) == pngs(tmp_path / "ref") and len(pngs(out)) == 2 * FRAMES  # alpha and fgr
        joined = records[checkpoint].channels["fgr"]
        assert [(p["start"], p["frames"]) for p in joined["cores"]] == [(20 * checkpoint, 8), (20 * checkpoint + 8, 12)]
        assert len({p["name"] for p in joined["cores"]}) == 2  # the continuation never overwrites the first piece
        a, b = states[0], ref_states[0]  # the state handed down the chain is the uninterrupted render's
        assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    if model == "synthetic":
        assert int(states[0]["frames"][0]) == 20  # the running count went through the checkpoint's saved state


def test_a_request_before_the_core_stops_at_the_first_boundary_inside_it(clip, tmp_path):
    """With a preroll the request arrives before the core: the shard stops at the first boundary past
    ``core_start``; the continuation needs no preroll and renders the same frames as one uninterrupted run."""
    worker = worker_for("synthetic")
    s = plan_shards("clip", FRAMES, 20, preroll=6)[1]  # renders [14, 40): preroll 14..20, grid 14, 20, 22, 30, 38
    assert render_ranges(s.start - s.preroll, s, None, 8) == [(14, 20), (20, 22), (22, 30), (30, 38), (38, 40)]
    ref = worker.render_shard(task_for(clip, tmp_path / "ref", s, chunk=8), None, None)[0]
    task = task_for(clip, tmp_path / "out", s, chunk=8)
    worker.checkpoint(task.name)
    partial = ShardRecord.from_dict(worker.render_shard(task, None, None)[0])
    assert partial.stopped_at == 22 and partial.rendered_frames == 8
    rest = worker.render_shard(replace(task, resume_from=22, state_url=partial.state_url), None, None)[0]
    assert rest["rendered_frames"] == 18 and rest["resumed_from"] == 22
    assert render_ranges(14, s, None, 8, resume_from=22) == [(22, 30), (30, 38), (38, 40)]
    assert pngs(tmp_path / "out") == pngs(tmp_path / "ref")
    joined = partial.join(ShardRecord.from_dict(rest))
    assert joined.rendered_frames == ref["rendered_frames"] == 26


def test_a_request_past_the_core_lets_the_shard_finish(clip, tmp_path):
    """One chunk covers the whole core: there is no boundary inside it, so the shard finishes as usual."""
    worker = worker_for("synthetic")
    (s,) = plan_shards("clip", FRAMES, 64)
    task = task_for(clip, tmp_path, s, chunk=None)
    worker.checkpoint(task.name)
    record, _ = worker.render_shard(task, None, None)
    assert record["stopped_at"] is None and record["rendered_frames"] == FRAMES
    assert not worker.checkpoints  # the request does not outlive the attempt


def test_resume_only_on_the_chunk_grid_and_records_join_only_in_order(clip, tmp_path):
    worker = worker_for("synthetic")
    s = plan_shards("clip", FRAMES, 20)[0]
    with pytest.raises(ValueError, match="not a chunk boundary"):
        worker.render_shard(task_for(clip, tmp_path, s, chunk=8, resume_from=5), None, None)
    first = ShardRecord(shard=s.to_dict(), channels={}, stopped_at=8)
    with pytest.raises(ValueError, match="does not follow"):
        first.join(ShardRecord(shard=s.to_dict(), channels={}, resumed_from=16))


def test_a_partial_record_is_not_a_done_marker(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger"))
    piece = {"name": "core-0001", "start": 20, "frames": 8}
    ledger.mark_shard_partial("clip", 1, ShardRecord(shard={"index": 1}, channels={"alpha": {"core": piece}},
                                                     stopped_at=28, state_url="s.npz"))
    assert ledger.done_shards("clip") == {}
    (partial,) = ledger.partial_records("clip").values()
    assert partial.stopped_at == 28 and core_pieces(partial.channels["alpha"]) == [piece]


def test_writers_check_the_partial_span(clip, tmp_path):
    """A partial piece is checked against the frames up to the checkpoint, not waved through: a writer told it
    stopped at a frame its piece does not reach fails the shard."""
    from farm.sinks import make_sink
    from farm.writers import ChannelWriter

    s = plan_shards("clip", FRAMES, 20)[0]
    task: ShardTask = task_for(clip, tmp_path, s, chunk=8)
    writer = ChannelWriter("alpha", make_sink(task.targets["alpha"]), task, None, worker_for("synthetic").writing, 1)
    frames = np.zeros((8, 48, 64, 3), np.uint8)
    writer.write((0, 8, {"alpha": frames[..., :1].astype(np.float32), "fgr": frames.astype(np.float32)}))
    writer.stopped_at = 16
    with pytest.raises(SinkError, match="segment has 8 frames, the plan says 16"):
        writer.finish()


def test_a_killed_job_resumes_a_checkpointed_shard_from_its_frame(ray_session, clip, tmp_path):
    """A job was killed after shard 1 of its chain checkpointed at frame 36 (its partial record and state in the
    ledger, written here by the actor's own code in process): run again, it renders nothing but shard 1 from
    frame 36 with the saved state, and the output equals a fault-free run's."""
    import yaml

    from farm import intake
    from farm.driver import JobRunner, run_job
    from farm.manifest_inputs import input_fingerprint
    from farm.spec import parse_spec
    from farm.video_run import shard_task

    def spec(out: Path):
        return parse_spec(yaml.safe_dump({
            "name": "ckpt", "inputs": [clip], "model": {"name": "synthetic"},
            "window": {"frames": 20, "state": "handoff"},
            "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
            "resources": {"actors": 1}}), "ckpt.yaml")

    reference = run_job(spec(tmp_path / "ref"))
    assert reference.ok, reference.manifest

    killed = JobRunner(spec(tmp_path / "out"))  # what the killed run had done: its plan, shard 1 checkpointed
    runs, _ = intake.open_inputs(killed.spec, killed.ledger, killed.fail_video, killed.event)
    intake.probe_all(killed.spec, list(runs.values()), killed.fail_video)
    intake.build_graphs(killed.spec, list(runs.values()), killed.model_cls, killed.ledger, killed.fail_video)
    (run,) = runs.values()
    worker, fingerprint = worker_for("synthetic"), input_fingerprint(clip)
    first, state = worker.render_shard(shard_task(killed.spec, run, run.unit("shard-0000"), killed.model_cls,
                                                  "handoff", killed.ledger)[0], None, None)
    killed.ledger.mark_shard_done(run.key, 0, {**first, "input": fingerprint})
    run.state_refs[0] = state  # shard 1 gets shard 0's state in memory, as an ObjectRef in a job
    task, _ = shard_task(killed.spec, run, run.unit("shard-0001"), killed.model_cls, "handoff", killed.ledger)
    worker.checkpoint(task.name)
    partial = ShardRecord.from_dict(worker.render_shard(task, None, state)[0])
    partial.input = fingerprint
    assert partial.stopped_at == 36  # the synthetic model's chunks of 16 from frame 20: the first boundary
    killed.ledger.mark_shard_partial(run.key, 1, partial)

    resumed = run_job(spec(tmp_path / "out"))
    assert resumed.ok, resumed.manifest
    assert pngs(tmp_path / "out") == pngs(tmp_path / "ref") and len(pngs(tmp_path / "out")) == FRAMES
    done = killed.ledger.shard_records(run.key)
    assert done[1].rendered_frames == 20 and not partial.resumed_from  # 16 before the kill, 4 after it
    assert [p["start"] for p in done[1].channels["alpha"]["cores"]] == [20, 36]
    (event,) = [e for e in killed.ledger.read_events() if e["event"] == "resumed"]
    assert event["shards_done"] == [0] and event["shards_partial"] == {"1": 36}
    (dispatched,) = [e for e in killed.ledger.read_events() if e["event"] == "shard_dispatched"]
    assert dispatched["shard"] == 1


def test_mp4_pieces_of_a_checkpointed_shard_join_by_remux(clip, tmp_path):
    """mp4: the partial piece and the continuation's are segments of their own, joined by the commit's remux
    concat into one file of every frame (the frame-accurate decode of each is checked where it is written)."""
    from farm.assemble import commit_output
    from farm.video import decoded_frame_count

    worker = worker_for("synthetic")
    (s,) = plan_shards("clip", FRAMES, 64)
    task = task_for(clip, tmp_path, s, fmt="mp4", channels=("alpha",), chunk=8)
    worker.checkpoint(task.name)
    partial = ShardRecord.from_dict(worker.render_shard(task, None, None)[0])
    rest = worker.render_shard(replace(task, resume_from=partial.stopped_at), None, None)[0]
    pieces = core_pieces(partial.join(ShardRecord.from_dict(rest)).channels["alpha"])
    assert [(p["start"], p["frames"]) for p in pieces] == [(0, 8), (8, 32)]
    assert pieces[0]["url"] != pieces[1]["url"]
    out = commit_output(task.targets["alpha"], pieces)
    assert out["frames"] == FRAMES == decoded_frame_count(out["url"])
