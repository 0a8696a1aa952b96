"""The model actor: loads a model once, then renders many shards, decoding its own frames.

A shard's result goes straight to storage (core segment, overlap frames, handed-off state), so the
driver never moves pixels; the actor returns a small record and the state (as a second ObjectRef,
so the next shard of a chain receives it actor-to-actor through the object store).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.base import State, VideoContext
from farm import storage
from farm.channels import Background
from farm.grid import render_ranges, stops_at
from farm.ledger import Ledger
from farm.pipeline import ChunkReader, CudaStager, Pipeline, Ticket, Turns, stack_frames
from farm.plan import Shard
from farm.sinks import OutputTarget, make_sink
from farm.writers import ChannelWriter, WholeKeeper


@dataclass(frozen=True)
class ModelConfig:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    gpu_memory_gb: float | None = None


@dataclass(frozen=True)
class ShardTask:
    """Everything an actor needs to render one shard, and nothing it must look up elsewhere."""

    job_id: str
    video_key: str
    url: str
    shard: Shard
    targets: dict[str, OutputTarget]  # channel -> where it goes
    ledger_root: str
    handoff_at: int | None = None  # frame index at which to capture the state for the next shard
    state_url: str | None = None  # a saved state to start from (resume), when no state ref is given
    chunk: int | None = 16  # frames per render call for chunkable models; None = whole shard
    background: tuple[float, float, float] | str = (0.0, 0.0, 0.0)  # colour, or an image/video URL for comp
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    tag: str = ""  # suffix of this attempt's part names: a speculative copy never overwrites the original's
    resume_from: int | None = None  # continue a checkpointed shard from this frame (state_url: its state there)
    passes: int = 1  # the model's passes: with 2, stage-0 shards keep their whole output for stage 1
    previous: list[dict[str, Any]] = field(default_factory=list)  # stage 1: pass-1 {start, stop, url} of i-1, i, i+1
    blend: str = "linear"  # ramp for blending pass-1 overlaps before stage 1 sees them
    order: int = 0  # the driver's dispatch order (its attempt id): an actor's model takes shards in this order

    @property
    def name(self) -> str:
        return f"{self.job_id}/{self.video_key}/{self.shard.name}"


class ShardCancelled(RuntimeError):
    """The driver aborted this shard (another copy of it won): nothing of it was uploaded."""


def load_npz(url: str, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(url, storage_options)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_error_line(config: ModelConfig, step: str, e: BaseException) -> str:
    """Why a model did not load, as one line naming the spec field at fault (and the weights file)."""
    from actors.base import ModelError
    from farm.weights import WeightsError

    lines = str(e).strip().splitlines()
    reason = lines[0] if lines else ""
    if not isinstance(e, (ModelError, WeightsError, MemoryError)):
        reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
    if step == "resources.gpu_memory_gb" or isinstance(e, WeightsError):
        return reason  # these name their field or their file already
    if step == "model.weights":
        return f"model.weights {config.weights}: {reason}"
    return f"{step}: {reason}" if step != "model" else reason


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelWorker:
    """Plain class (wrapped by ``ray.remote`` in the driver) so it can also be used in-process."""

    def __init__(self, config: ModelConfig, storage_options: dict[str, Any] | None = None) -> None:
        from actors import load_model_class

        t0 = time.perf_counter()
        self.config = config
        # Heartbeat: read by ``ping`` on the actor's second thread while a shard renders on the first.
        self.progress, self.call_started, self.max_call_s = 0, None, 0.0
        self.aborted: set[str] = set()
        self.checkpoints: set[str] = set()  # attempts to stop at their next chunk boundary (``checkpoint``)
        # Output writes in progress (``writing``): ``abort`` waits for them, so once abort returns the aborted
        # attempt writes nothing more (png outputs are written straight to their final keys).
        self._writes, self._active_writes = threading.Condition(), 0
        self._prefetched: list[ChunkReader] = []  # the next shards' first chunks, decoding (``prefetch``)
        self._prefetch_lock, self.prefetch_hits = threading.Lock(), 0
        # The model's turns: a second shard queued on this actor (max_concurrency >= 3) decodes its first
        # chunks and starts its model calls while the first one's encoders finish.
        self._turns = Turns()
        # A model that cannot load is reported by ``info()``, never raised: an exception escaping
        # ``__init__`` fails Ray's creation task, which prints a traceback and a crash dump on the driver.
        self.load_error: str | None = None
        self.load_detail: str | None = None
        step = "model.params"
        try:
            self.model = load_model_class(config.name)(**config.params)
            weights = None
            if config.weights:
                from farm.weights import resolve

                step = "model.weights"
                weights = str(resolve(config.weights, storage_options=storage_options or {}))
            device = pick_device(config.device) if self.model.needs_weights else "cpu"
            step = "model.weights" if weights else "model"
            self.model.load(weights, device=device, dtype=config.dtype)
            step = "resources.gpu_memory_gb"
            self.check_memory_budget()
        except Exception as e:
            self.model = None
            self.load_error = load_error_line(config, step, e)
            self.load_detail = traceback.format_exc(limit=20)
        self.load_seconds = time.perf_counter() - t0

    def check_memory_budget(self) -> None:
        budget = self.config.gpu_memory_gb
        used = self.model.memory_bytes()
        if budget is not None and used > budget * 2**30:
            raise MemoryError(
                f"{self.config.name}: the loaded model holds {used / 2**30:.2f} GiB, over the per-actor "
                f"budget resources.gpu_memory_gb={budget}"
            )

    @property
    def node(self) -> str | None:
        """The Ray node this actor runs on (node blocklists count failures per node)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def info(self) -> dict[str, Any]:
        """Where the actor runs and how its model loaded; ``error`` (one line) and ``detail`` (the
        traceback, for the ledger's events) when it did not."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "node": self.node, "load_seconds": self.load_seconds}
        if self.load_error:
            info.update(error=self.load_error, detail=self.load_detail)
        return info

    def ping(self) -> dict[str, Any]:
        """Liveness and progress, answered on a second thread (the actor runs max_concurrency=2)."""
        call_s = time.monotonic() - self.call_started if self.call_started is not None else 0.0
        return {"progress": self.progress, "call_s": call_s, "max_call_s": self.max_call_s, "node": self.node}

    def abort(self, name: str) -> None:
        """Stop the shard attempt ``name`` (task name + tag) at its next chunk, before it uploads anything.

        Returns once that attempt can write no more frames: the driver waits for it before it kills
        actors at the end of a job, so no write is cut off halfway and no temporary is left behind."""
        with self._writes:
            self.aborted.add(name)
            self._writes.wait_for(lambda: self._active_writes == 0)

    def checkpoint(self, name: str) -> None:
        """Ask the shard attempt ``name`` to stop at its next chunk boundary inside its core and save its state
        there (its node is being drained). Answered at once, on the actor's second thread."""
        self.checkpoints.add(name)

    def stop_if_aborted(self, task: ShardTask) -> None:
        if task.name + task.tag in self.aborted:
            raise ShardCancelled(f"{task.name}{task.tag}: cancelled, another copy finished first")

    def prepare(self, video: VideoContext) -> Any:
        return self.model.prepare(video)

    def _render(
        self, batch: np.ndarray, start: int, cond: Any, state: State | None, splittable: bool, splits: list[int]
    ) -> tuple[dict[str, np.ndarray], State | None]:
        """``model.render``; on out of memory, halve the batch and render the halves in turn (down to one
        frame). A render keeps no hidden state, so the state before the failed call is still ``state``.
        ``start`` is the video frame index of ``batch[0]``, given to models that read per-frame
        conditioning of their own (masks) as ``span=(start, stop)``."""
        try:
            if self.model.takes_span:
                return self.model.render(batch, cond, state, span=(start, start + len(batch)))
            return self.model.render(batch, cond, state)
        except Exception as e:
            if not (splittable and len(batch) > 1 and _is_oom(e)):
                raise
        splits.append(len(batch))
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed call's blocks back before retrying
        h = len(batch) // 2
        first, state = self._render(batch[:h], start, cond, state, splittable, splits)
        second, state = self._render(batch[h:], start + h, cond, state, splittable, splits)
        return {k: np.concatenate([first[k], second[k]]) for k in first}, state

    def prefetch(self, url: str, shard: Shard, handoff_at: int | None = None, storage_options=None) -> None:
        """Start decoding ``shard``'s first chunks now, while the current shard finishes (or, in a handoff
        chain, before its state arrives): its ``render_shard`` takes them over if its frames are these.

        A hint from the driver, answered at once (on the actor's second thread): a wrong guess costs one
        bounded queue of decoded chunks, dropped once ``PREFETCH_SLOTS`` newer hints came."""
        ranges = render_ranges(shard.start - shard.preroll, shard, handoff_at, self.model.chunk_frames)
        depth = pipeline_depth()
        if not depth:
            return
        reader = ChunkReader(url, ranges, storage_options or {}, depth=depth, stage=self._stage()).start()
        with self._prefetch_lock:
            self._prefetched.append(reader)
            stale = self._prefetched[:-PREFETCH_SLOTS]
            del self._prefetched[:-PREFETCH_SLOTS]
        for old in stale:
            old.close()

    def _reader(self, task: ShardTask, ranges: list[tuple[int, int]], depth: int, turn: Ticket) -> ChunkReader:
        """The prefetched reader when it decodes this shard's frames, else a new one that starts decoding
        when ``turn`` lets it."""
        with self._prefetch_lock:
            for reader in self._prefetched:
                if depth and reader.matches(task.url, ranges, task.storage_options):
                    self._prefetched.remove(reader)
                    self.prefetch_hits += 1
                    turn.decoded()  # decoding already
                    return reader
        return ChunkReader(task.url, ranges, task.storage_options, depth=depth, stage=self._stage(), turn=turn)

    def _stage(self) -> Any:
        """How decoded frames become a batch: stacked, or on CUDA stacked into pinned memory and uploaded."""
        device = getattr(self.model, "device", None)
        if device is not None and str(device).startswith("cuda"):
            return CudaStager(device)
        return stack_frames

    @property
    def cpus(self) -> float:
        """The CPUs this actor was given (``resources.cpus_per_actor``); every core in-process."""
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        if ctx is not None and ctx.worker.mode == ray.WORKER_MODE:  # an actor, not a driver using it in-process
            cpus = ctx.get_assigned_resources().get("CPU")
            if cpus:
                return float(cpus)
        return float(os.cpu_count() or 1)

    def render_shard(self, task: ShardTask, cond: Any, state: State | None) -> tuple[dict[str, Any], State | None]:
        """Decode -> model -> channels/encode/upload as a pipeline (``farm.pipeline``); returns the shard's
        record and the state for the next shard of a handoff chain."""
        t0 = time.perf_counter()
        s = task.shard
        turn = self._turns.take(task.order)  # first thing: the model's turns go in the driver's order
        ledger = Ledger(task.ledger_root, task.storage_options)  # its guarded state and pass-1 I/O
        splits: list[int] = []  # batch sizes that ran out of memory and were halved
        background, consumers, reader = None, {}, None
        try:
            if state is None and task.state_url:
                state = ledger.read_state(task.state_url)
            ranges = render_ranges(s.start - s.preroll, s, task.handoff_at, task.chunk, task.resume_from)
            depth = pipeline_depth()
            previous = load_previous(task, ledger) if s.stage == 1 else None
            reader = self._reader(task, ranges, depth, turn)
            background, consumers = self._consumers(task)
            with Pipeline(reader, consumers, depth=1 if depth else 0) as pipe:
                queued = time.perf_counter()
                turn.wait(lambda: self.stop_if_aborted(task))  # one shard's model calls at a time
                wait, cpu0 = time.perf_counter(), time.thread_time()
                try:
                    rendered, handoff_state, stopped = self._model_calls(task, pipe, cond, state, previous, splits)
                finally:
                    turn.leave()  # the next shard's model calls start; this one's writers finish beside them
                model_s, model_cpu_s = time.perf_counter() - wait, time.thread_time() - cpu0
                for c in consumers.values():  # a checkpoint: the writers check the frames up to it
                    c.stopped_at = stopped
                results = pipe.finish()
        finally:
            turn.leave()
            self.checkpoints.discard(task.name + task.tag)
            if reader is not None:
                reader.close()
            if background is not None:
                background.close()
        self.stop_if_aborted(task)

        record: dict[str, Any] = {"shard": s.to_dict(), "channels": {}, "rendered_frames": rendered,
                                  "resumed_from": task.resume_from, "stopped_at": stopped}
        for name, result in results.items():
            if name == PASS1:
                record["previous"] = result
            else:
                record["channels"][name] = result
        if handoff_state is not None:  # the next shard's state, or at a checkpoint the state to continue from
            name = s.name if stopped is None else f"{s.name}{task.tag}-at{stopped:06d}"
            record["state_url"] = ledger.write_state(task.video_key, name, handoff_state)
        if stopped is not None:
            handoff_state = None  # the chain's next shard waits for the continuation
        if splits:
            record["oom_splits"] = splits
        # Where the time goes: the model loop's wall and CPU seconds (waits on decoder and writers included),
        # and each pipeline thread's CPU seconds (none on the serial path, where the model loop does it all)
        record["stages"] = {"model_loop_s": model_s, "model_loop_cpu_s": model_cpu_s, "decode_cpu_s": reader.cpu_s,
                            "queued_s": wait - queued}  # behind another shard's model calls on this actor
        record["stages"].update({f"write_{k}_cpu_s": v for k, v in pipe.cpu_s.items()})
        record["seconds"] = time.perf_counter() - t0
        record["worker"] = {"host": socket.gethostname(), "pid": os.getpid(), "node": self.node}
        return record, handoff_state

    def _model_calls(
        self, task: ShardTask, pipe: Pipeline, cond: Any, state: State | None, previous: Any, splits: list[int]
    ) -> tuple[int, State | None, int | None]:
        """The model's calls over the shard's chunks, back to back; each output goes to the writers.
        Returns the frames rendered, the state to hand to the next shard and, when ``checkpoint`` stopped it
        at frame k, k (the state returned is then the state at k)."""
        s, rendered, handoff_state = task.shard, 0, None
        for a, b, batch in pipe.chunks():
            self.stop_if_aborted(task)
            self.call_started = time.monotonic()
            try:
                if previous is not None:  # pass 2 of a shard: one call over the whole window
                    prev = {k: v[a - s.start : b - s.start] for k, v in previous.items()}
                    shared = (s.core_start - s.start, s.stop - s.core_stop)
                    outputs, state = self.model.refine(batch, prev, cond, state, (a, b), *shared)
                    if b == s.stop and state is not None and s.stop > s.core_stop:
                        handoff_state = state  # the noise of the frames the next shard shares
                else:
                    outputs, state = self._render(batch, a, cond, state, task.chunk is not None, splits)
            finally:
                self.max_call_s = max(self.max_call_s, time.monotonic() - self.call_started)
                self.call_started = None
                self.progress += 1
            del batch
            rendered += b - a
            if b == task.handoff_at:
                handoff_state = state
            if b > s.start:  # preroll chunks only warm the state: their outputs are dropped
                pipe.emit((a, b, outputs))
            del outputs
            if previous is None and task.name + task.tag in self.checkpoints and stops_at(task, b):
                return rendered, state, b
        return rendered, handoff_state, None

    def _consumers(self, task: ShardTask) -> tuple[Background | None, dict[str, Any]]:
        """What runs behind the model: a writer per output channel, or pass 1's keeper of the whole window."""
        if task.passes == 2 and task.shard.stage == 0:  # pass 1: the whole window goes to pass 2, not to outputs
            return None, {PASS1: WholeKeeper(task, self.writing)}
        background = None
        if "comp" in task.targets:
            t = task.targets["comp"]
            background = Background(task.background, t.width, t.height, task.storage_options)
        # Each encoder may use every CPU of the actor: the channels' encoders run at once (alpha's is cheaper
        # than fgr's), and the OS balances their threads over the actor's cores.
        threads = max(1, round(self.cpus))
        consumers: dict[str, Any] = {}
        try:
            for ch, target in task.targets.items():
                consumers[ch] = ChannelWriter(ch, make_sink(target), task, background, self.writing, threads)
        except BaseException:
            for c in consumers.values():
                c.discard()
            if background is not None:
                background.close()
            raise
        return background, consumers

    @contextlib.contextmanager
    def writing(self, task: ShardTask) -> Iterator[None]:
        """Around each write of output frames: refused once ``abort`` has been called for this attempt, and
        ``abort`` waits for the writes in progress (several channels write at once)."""
        with self._writes:
            self.stop_if_aborted(task)
            self._active_writes += 1
        try:
            yield
        finally:
            with self._writes:
                self._active_writes -= 1
                self._writes.notify_all()


PREFETCH_SLOTS = 2  # hints kept: a hint may arrive before the shard it follows has taken its own
PASS1 = "pass1"  # the consumer name of pass 1's whole-window keeper


def pipeline_depth() -> int:
    """Chunks decoded ahead of the model; 0 runs the shard serially on one thread (``FARM_PIPELINE=0``,
    the baseline of bench/accelerator.py)."""
    return 0 if os.environ.get("FARM_PIPELINE", "1") == "0" else 2


def load_previous(task: ShardTask, ledger: Ledger) -> dict[str, np.ndarray]:
    """Pass 1's outputs over this shard's frames, ``float32 [T, H, W, C]``, its overlaps blended with the
    neighbours' exactly as the stitcher blends final outputs, so pass 2 sees what a one-pass render shows."""
    from farm.stitch import blend

    s = task.shard
    parts = [(p["start"], p["stop"], ledger.read_arrays(p["url"])) for p in task.previous]
    own = next(arrays for start, stop, arrays in parts if (start, stop) == (s.start, s.stop))
    out: dict[str, np.ndarray] = {}
    for k, v in own.items():
        frames = v.astype(np.float32) / 255.0
        for start, stop, arrays in parts:
            if stop == s.core_start and start < s.start < s.core_start:  # the previous shard: its tail is our head
                n = s.core_start - s.start
                tail = arrays[k][s.start - start :].astype(np.float32) / 255.0
                frames[:n] = blend(tail, frames[:n], task.blend)  # type: ignore[arg-type]
            elif start == s.core_stop < s.stop < stop:  # the next shard: our tail is its head
                n = s.stop - s.core_stop
                head = arrays[k][:n].astype(np.float32) / 255.0
                frames[-n:] = blend(frames[-n:], head, task.blend)  # type: ignore[arg-type]
        out[k] = frames
    return out


def _is_oom(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA or other accelerators), told apart without importing torch."""
    return any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(e).__mro__)

