"""The model actor: loads a model once, then renders many shards, decoding its own frames.

A shard's result goes straight to storage (core segment, overlap frames, handed-off state), so the
driver never moves pixels; the actor returns a small record and the state (as a second ObjectRef,
so the next shard of a chain receives it actor-to-actor through the object store).
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.base import State, VideoContext
from farm import storage
from farm.channels import Background, channel_frames
from farm.ledger import Ledger
from farm.plan import Shard
from farm.sinks import OutputTarget, SinkError, make_sink
from farm.stitch import to_uint8


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
    passes: int = 1  # the model's passes: with 2, stage-0 shards keep their whole output for stage 1
    previous: list[dict[str, Any]] = field(default_factory=list)  # stage 1: pass-1 {start, stop, url} of i-1, i, i+1
    blend: str = "linear"  # ramp for blending pass-1 overlaps before stage 1 sees them

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
        # Held while a shard writes output frames: ``abort`` takes it, so once abort returns the aborted
        # attempt writes nothing more (png outputs are written straight to their final keys).
        self.write_lock = threading.Lock()
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
        self.aborted.add(name)
        with self.write_lock:
            pass

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

    def render_shard(self, task: ShardTask, cond: Any, state: State | None) -> tuple[dict[str, Any], State | None]:
        t0 = time.perf_counter()
        s = task.shard
        ledger = Ledger(task.ledger_root, task.storage_options)  # its guarded state and pass-1 I/O
        if state is None and task.state_url:
            state = ledger.read_state(task.state_url)
        from farm.video import read_frames

        run_start = s.start - s.preroll
        frames = read_frames(task.url, run_start, s.stop, storage_options=task.storage_options)
        keep_whole = task.passes == 2 and s.stage == 0  # pass 1: the whole window goes to pass 2, not to outputs
        sinks = {} if keep_whole else {ch: make_sink(t) for ch, t in task.targets.items()}
        whole: dict[str, list[np.ndarray]] = {}
        previous = load_previous(task, ledger) if s.stage == 1 else None
        background = None
        if "comp" in sinks:
            t = task.targets["comp"]
            background = Background(task.background, t.width, t.height, task.storage_options)
        cores = {ch: sink.open_piece(f"core-{s.index:04d}{task.tag}", s.core_start) for ch, sink in sinks.items()}
        heads: dict[str, list[np.ndarray]] = {ch: [] for ch in sinks}
        tails: dict[str, list[np.ndarray]] = {ch: [] for ch in sinks}
        handoff_state: State | None = None
        rendered = 0
        splits: list[int] = []  # batch sizes that ran out of memory and were halved

        for a, b in _render_ranges(run_start, s, task.handoff_at, task.chunk):
            batch = np.stack(list(itertools.islice(frames, b - a)))  # [t, H, W, 3] uint8
            if len(batch) != b - a:
                raise RuntimeError(f"{task.name}: decoded {len(batch)} frames for [{a}, {b}) of {task.url}")
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
            rendered += b - a
            if b == task.handoff_at:
                handoff_state = state
            if b <= s.start:
                continue  # preroll: warms the state, output discarded
            if keep_whole:
                for k, v in outputs.items():
                    whole.setdefault(k, []).append(to_uint8(v[max(a, s.start) - a :]))
            with self.write_lock:
                self.stop_if_aborted(task)
                for ch in sinks:
                    out = channel_frames(outputs, ch, background, start=a)  # [t, H, W, C] float32
                    for lo, hi, dest in ((s.start, s.core_start, heads[ch]), (s.core_stop, s.stop, tails[ch])):
                        if max(a, lo) < min(b, hi):
                            dest.append(out[max(a, lo) - a : min(b, hi) - a].astype(np.float16))
                    lo, hi = max(a, s.core_start), min(b, s.core_stop)
                    if lo < hi:
                        cores[ch].write(to_uint8(out[lo - a : hi - a]))
        frames.close()
        if background is not None:
            background.close()
        self.stop_if_aborted(task)

        record: dict[str, Any] = {"shard": s.to_dict(), "channels": {}, "rendered_frames": rendered}
        for ch in sinks:
            entry: dict[str, Any] = {"core": cores[ch].close()}
            if entry["core"]["frames"] != s.core_stop - s.core_start:  # the plan, not what the model returned
                raise SinkError(
                    f"{task.name}: {ch} segment has {entry['core']['frames']} frames, the plan says "
                    f"{s.core_stop - s.core_start} (frames lost between model and encoder)"
                )
            for side, parts in (("head", heads[ch]), ("tail", tails[ch])):
                if parts:
                    url = storage.join(task.targets[ch].parts_url, f"{s.name}{task.tag}.{side}.npz")
                    entry[side] = ledger.write_arrays(url, {"frames": np.concatenate(parts)})
            record["channels"][ch] = entry
        if keep_whole:
            arrays = {k: np.concatenate(v) for k, v in whole.items()}
            record["previous"] = ledger.write_pass1(task.video_key, f"{s.name}{task.tag}", arrays)
        if handoff_state is not None:
            record["state_url"] = ledger.write_state(task.video_key, s.name, handoff_state)
        if splits:
            record["oom_splits"] = splits
        record["seconds"] = time.perf_counter() - t0
        record["worker"] = {"host": socket.gethostname(), "pid": os.getpid(), "node": self.node}
        return record, handoff_state


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


def _render_ranges(run_start: int, s: Shard, handoff_at: int | None, chunk: int | None) -> list[tuple[int, int]]:
    """Half-open ranges the shard is rendered in: cut where the preroll ends, where the state is
    handed off, and every ``chunk`` frames (bounded memory for per-frame and recurrent models)."""
    cuts = {run_start, s.start, s.stop}
    if handoff_at is not None and run_start < handoff_at < s.stop:
        cuts.add(handoff_at)
    if chunk:
        cuts.update(range(run_start, s.stop, chunk))
    edges = sorted(c for c in cuts if run_start <= c <= s.stop)
    return list(itertools.pairwise(edges))
