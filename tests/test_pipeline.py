"""The actor as a pipeline (decode -> model -> encode), in process (no Ray): the same bytes as the serial loop,
every failure ends the shard with no thread left and nothing partial uploaded, abort leaves no temporary, and
no queue ever holds more than its depth. No timing is asserted."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from media import write_video

from farm.channels import components
from farm.pipeline import BACKGROUND_NICE, ChunkReader, Pipeline, Turns
from farm.plan import plan_shards
from farm.sinks import OutputTarget
from farm.video import probe
from farm.worker import ModelConfig, ModelWorker, ShardCancelled, ShardTask

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RVM_WEIGHTS = SHARED / "reference/rvm/rvm_mobilenetv3_random.pth"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return write_video(tmp_path_factory.mktemp("pipe") / "clip.mp4", 40, (64, 48))


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """Segment temporaries go to this test's folder, so a leaked one shows."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d


def farm_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("farm-")]


def targets(url: str, out: Path, fmt: str, channels: tuple[str, ...], width: int | None = None):
    info = probe(url)
    return {
        ch: OutputTarget(
            url=str(out / f"{ch}" if fmt == "png" else out / f"{ch}.{fmt}"),
            parts_url=str(out / "parts" / ch),
            format=fmt,
            fps_num=info.fps_num,
            fps_den=info.fps_den,
            width=width or info.width,
            height=info.height,
            components=components(ch),
        )
        for ch in channels
    }


def task_for(url: str, out: Path, shard, fmt: str = "png", channels=("alpha", "fgr"), **kw) -> ShardTask:
    return ShardTask(
        job_id="job",
        video_key="clip",
        url=url,
        shard=shard,
        targets=kw.pop("targets", None) or targets(url, out, fmt, channels),
        ledger_root=str(out / "ledger"),
        **kw,
    )


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def render_chain(worker: ModelWorker, url: str, out: Path, frames: int, handoff: bool, prefetch: bool) -> list:
    """Every shard of the clip in order on one worker (a handoff chain when ``handoff``); the states out."""
    n = probe(url).frame_count
    shards = plan_shards("clip", n, frames)
    state, states = None, []
    for i, s in enumerate(shards):
        handoff_at = shards[i + 1].start if handoff and i + 1 < len(shards) else None
        task = task_for(url, out, s, chunk=worker.model.chunk_frames, handoff_at=handoff_at)
        if prefetch and i + 1 < len(shards):  # as the driver does: the next shard's frames, early
            nxt = shards[i + 1]
            worker.prefetch(url, nxt, shards[i + 2].start if handoff and i + 2 < len(shards) else None)
        _, state = worker.render_shard(task, None, state if handoff else None)
        states.append(state)
    return states


@pytest.mark.parametrize("model", ["keyer", "rvm"])
def test_pipelined_outputs_equal_the_serial_loop(model, clip, tmp_path, monkeypatch):
    """png bytes, overlap parts and handed-off states are those of the serial loop (keyer: 3 shards; RVM: a
    handoff chain of 3 shards with the next shard prefetched)."""
    if model == "rvm":
        if not RVM_WEIGHTS.exists():
            pytest.skip("../shared reference weights are absent")
        config = ModelConfig("rvm", {"downsample_ratio": 0.5}, str(RVM_WEIGHTS))
    else:
        config = ModelConfig("keyer", {"key": "green"})
    worker = ModelWorker(config)
    handoff = model == "rvm"
    got = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("FARM_PIPELINE", mode)
        states = render_chain(worker, clip, tmp_path / mode, 16, handoff, prefetch=mode == "1")
        got[mode] = (files(tmp_path / mode), states)
        assert not farm_threads()
    (serial, s_states), (piped, p_states) = got["0"], got["1"]
    assert len([k for k in serial if k.endswith(".png")]) == 2 * 40
    assert serial == piped
    if handoff:
        assert worker.prefetch_hits == 2  # shards 1 and 2 took their prefetched chunks
        assert all(s is not None for s in p_states[:-1])
        for a, b in zip(s_states[:-1], p_states[:-1], strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_mp4_segments_keep_their_frame_counts(clip, tmp_path):
    worker = ModelWorker(ModelConfig("synthetic"))
    (shard,) = plan_shards("clip", 40, 64)
    record, _ = worker.render_shard(task_for(clip, tmp_path, shard, fmt="mp4", chunk=8), None, None)
    for ch in ("alpha", "fgr"):
        core = record["channels"][ch]["core"]
        assert core["frames"] == 40 and probe(core["url"]).frame_count == 40
    assert not farm_threads() and not os.listdir(tempfile.tempdir)


def failing_render(worker: ModelWorker, task: ShardTask, tmpdir: str) -> Exception:
    with pytest.raises(Exception) as info:
        worker.render_shard(task, None, None)
    assert not farm_threads(), farm_threads()  # decoder and writers joined before the error came out
    assert not os.listdir(tmpdir)  # segment temporaries removed
    assert "\n" not in str(info.value)
    return info.value


def test_failing_encoder_ends_the_shard_cleanly(clip, tmp_path, own_tempdir):
    """The fgr encoder refuses its frames (the target is 2 pixels wider than the frames): the shard fails
    with the encoder's one line; the other channel's piece is not uploaded."""
    worker = ModelWorker(ModelConfig("synthetic"))
    (shard,) = plan_shards("clip", 40, 64)
    tg = targets(clip, tmp_path, "mp4", ("alpha", "fgr"))
    tg["fgr"] = targets(clip, tmp_path, "mp4", ("fgr",), width=66)["fgr"]
    e = failing_render(worker, task_for(clip, tmp_path, shard, chunk=8, targets=tg), str(own_tempdir))
    assert "frame must be uint8 (48, 66, 3)" in str(e)
    assert not (tmp_path / "parts").exists()


def test_failing_upload_ends_the_shard_cleanly(clip, tmp_path, own_tempdir):
    """The pieces' folder cannot be made (a file is in the way): the upload's error fails the shard."""
    worker = ModelWorker(ModelConfig("synthetic"))
    (shard,) = plan_shards("clip", 40, 64)
    (tmp_path / "parts").write_text("in the way")
    failing_render(worker, task_for(clip, tmp_path, shard, fmt="mp4", chunk=8), str(own_tempdir))


def test_failing_decoder_ends_the_shard_cleanly(clip, tmp_path, own_tempdir):
    """The shard asks for frames past the end of the video: the decoder fails after some chunks went through
    the model; its error is the shard's, and no piece is uploaded."""
    from farm.plan import Shard
    from farm.video import VideoError

    worker = ModelWorker(ModelConfig("synthetic"))
    shard = Shard("clip", 0, 0, 56, 0, 56)
    e = failing_render(worker, task_for(clip, tmp_path, shard, fmt="mp4", chunk=8), str(own_tempdir))
    assert isinstance(e, VideoError) and "ends at frame 40" in str(e)
    assert worker.progress == 5  # 5 chunks of 8 rendered before the decoder's error arrived
    assert not (tmp_path / "parts").exists()


class FailsAtCall:
    """Wraps a model: its ``n``-th render call raises."""

    def __init__(self, model, n: int) -> None:
        self.model, self.n, self.calls = model, n, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def render(self, frames, cond, state, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("model failed on purpose")
        return self.model.render(frames, cond, state, **kw)


def test_model_error_stops_decoder_and_encoders(clip, tmp_path, own_tempdir):
    worker = ModelWorker(ModelConfig("synthetic"))
    worker.model = FailsAtCall(worker.model, 3)
    (shard,) = plan_shards("clip", 40, 64)
    e = failing_render(worker, task_for(clip, tmp_path, shard, fmt="mp4", chunk=8), str(own_tempdir))
    assert str(e) == "model failed on purpose"
    assert not (tmp_path / "parts").exists()  # no partial piece


def test_abort_mid_shard_leaves_no_temporary(clip, tmp_path):
    """A speculative copy (png, written straight to the final folder) is aborted mid-shard: once ``abort``
    returns, nothing more is written, no hidden temporary is left, and the shard ends cancelled."""
    worker = ModelWorker(ModelConfig("synthetic", {"sleep_per_frame": 0.02}))
    (shard,) = plan_shards("clip", 40, 64)
    task = task_for(clip, tmp_path, shard, chunk=4, tag=".copy1")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.render_shard(task, None, None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    while worker.progress < 3 and t.is_alive():
        time.sleep(0.01)
    worker.abort(task.name + task.tag)
    written = sorted(p.name for p in tmp_path.rglob("*.png"))
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], ShardCancelled)
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == written  # nothing after abort returned
    assert 0 < len(written) < 80
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no hidden temporaries
    assert not farm_threads()


def test_queues_never_hold_more_than_their_depth(monkeypatch):
    """A fast decoder and a slow writer: the decoder is never more than its depth (plus the chunk it is
    stacking) ahead of the model, and the writer's queue never holds more than its depth."""
    decoded = []

    def read(url, start, stop, storage_options=None):
        for i in range(start, stop):
            decoded.append(i)
            yield np.full((2, 2, 3), i % 256, np.uint8)

    ranges = [(a, a + 4) for a in range(0, 64, 4)]
    reader = ChunkReader("mem://clip", ranges, depth=2, read=read)
    seen, ahead = [], []

    class SlowWriter:
        def write(self, item):
            time.sleep(0.005)
            seen.append(item[0])

        def finish(self):
            return len(seen)

        def discard(self):
            pass

    with Pipeline(reader, {"w": SlowWriter()}, depth=1) as pipe:
        for a, b, batch in pipe.chunks():
            ahead.append(len(decoded) - b)  # frames decoded beyond the chunk the model holds
            assert batch[:, 0, 0, 0].tolist() == list(range(a, b))
            time.sleep(0.002)
            pipe.emit((a, b, batch))
        assert pipe.finish() == {"w": 16}
    assert seen == [a for a, _ in ranges]
    assert reader.queue.high <= 2 and pipe.queues["w"].high <= 1
    assert max(ahead) <= (2 + 1) * 4  # two queued chunks and the one being stacked
    assert not farm_threads()


def test_stage_failure_is_raised_once_and_everything_joins():
    """A writer that fails on its second item: the model's loop gets that error, the decoder is stopped."""

    def read(url, start, stop, storage_options=None):
        for _ in range(start, stop):
            yield np.zeros((2, 2, 3), np.uint8)

    class Bad:
        n = 0

        def write(self, item):
            self.n += 1
            if self.n == 2:
                raise OSError("disk full")

        def finish(self):
            return None

        def discard(self):
            self.discarded = True

    bad = Bad()
    reader = ChunkReader("mem://clip", [(a, a + 2) for a in range(0, 400, 2)], depth=2, read=read)
    with pytest.raises(OSError, match="disk full"), Pipeline(reader, {"bad": bad}, depth=1) as pipe:
        for a, b, batch in pipe.chunks():
            pipe.emit((a, b, batch))
        pipe.finish()
    assert bad.discarded and not farm_threads()


class CountsOverlap:
    """Wraps a model: records the most render calls ever running at once."""

    def __init__(self, model) -> None:
        self.model, self.running, self.most = model, 0, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def render(self, frames, cond, state, **kw):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.01)
            return self.model.render(frames, cond, state, **kw)
        finally:
            with self.lock:
                self.running -= 1


def test_two_shards_queued_on_one_actor_take_turns_on_the_model(clip, tmp_path):
    """Two shards sent to one worker at once (a scheduler that queues the next shard): their model calls
    never overlap, and the outputs are those of the shards rendered one after the other."""
    worker = ModelWorker(ModelConfig("synthetic"))
    worker.model = CountsOverlap(worker.model)
    shards = plan_shards("clip", 40, 20)
    for s in shards:
        worker.render_shard(task_for(clip, tmp_path / "one", s, chunk=4), None, None)
    errors: list[BaseException] = []

    def run(s) -> None:
        try:
            worker.render_shard(task_for(clip, tmp_path / "two", s, chunk=4), None, None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and worker.model.most == 1
    assert files(tmp_path / "one") == files(tmp_path / "two") and len(files(tmp_path / "one")) == 80
    assert not farm_threads()


def test_turns_go_in_the_drivers_order_until_a_shard_begins():
    """Ray may start a queued shard's call before the current one's: the one the driver sent first still
    gets the model first, unless the later one's model calls had already begun."""
    turns = Turns()
    got: list[int] = []

    def go(ticket, leave: bool = True) -> threading.Thread:
        def run() -> None:
            ticket.wait()
            got.append(ticket.order)
            if leave:
                ticket.leave()

        t = threading.Thread(target=run, daemon=True)  # a broken order fails the asserts, never hangs the run
        t.start()
        return t

    late = turns.take(order=7)  # arrived first
    early = turns.take(order=3)
    go(early, leave=False).join(5)
    assert got == [3] and early.holding and not late.holding  # ``early`` went first, and holds the model
    first_in = turns.take(order=1)  # sent earlier still, but ``early`` holds the model: it waits behind it
    threads = [go(late), go(first_in)]
    time.sleep(0.2)
    assert got == [3]  # both wait for ``early``
    early.leave()
    for t in threads:
        t.join(5)
    assert got == [3, 1, 7]


def test_a_waiting_shard_decodes_once_the_shard_before_it_has_its_first_chunk():
    turns = Turns()
    decoded: dict[str, list[int]] = {"a": [], "b": []}

    def reader(name: str, ticket) -> ChunkReader:
        def read(url, start, stop, storage_options=None):
            for i in range(start, stop):
                decoded[name].append(i)
                yield np.zeros((2, 2, 3), np.uint8)

        return ChunkReader(f"mem://{name}", [(0, 4), (4, 8)], depth=1, read=read, turn=ticket)

    ta, tb = turns.take(order=1), turns.take(order=2)
    rb = reader("b", tb).start()
    time.sleep(0.2)
    assert decoded["b"] == [] and not tb.may_decode.is_set()  # a has not decoded anything yet
    ra = reader("a", ta).start()
    ta.wait()
    assert ra.next()[:2] == (0, 4)
    assert tb.may_decode.wait(5)  # a's first chunk is in: b decodes ahead while a renders
    ta.leave()
    tb.wait()
    assert rb.next()[:2] == (0, 4) and rb.next()[:2] == (4, 8) and rb.next() is None
    tb.leave()
    ra.close()
    rb.close()
    assert decoded["b"] == list(range(8)) and not farm_threads()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_decoders_and_writers_run_nicer_than_the_models_thread():
    """When the actor's CPUs are short, the thread that feeds the model goes first."""
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if mine >= 19:
        pytest.skip("this process runs at nice 19 already: its threads cannot go lower")
    seen: dict[str, int] = {}

    def read(url, start, stop, storage_options=None):
        seen["decoder"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        for _ in range(start, stop):
            yield np.zeros((2, 2, 3), np.uint8)

    class Writer:
        def write(self, item):
            seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def finish(self):
            return None

        def discard(self):
            pass

    reader = ChunkReader("mem://clip", [(0, 2), (2, 4)], depth=2, read=read)
    with Pipeline(reader, {"w": Writer()}, depth=1) as pipe:
        for a, b, batch in pipe.chunks():
            pipe.emit((a, b, batch))
        pipe.finish()
    want = min(19, mine + BACKGROUND_NICE)
    assert seen == {"decoder": want, "writer": want}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
