"""What every model plugin shares: its window, its outputs, and the render contract.

A model is one small class per file (``actors/<name>.py``). It never imports another adapter.

The contract, in the spirit of RVM's ``fgr, pha, *rec = model(src, *rec)``::

    model = Model(**params)
    model.load(weights, device="cpu", dtype="float32")   # once per actor
    cond = model.prepare(video, params)                  # once per video (e.g. FTP-VM memory)
    outputs, state = model.render(frames, cond, state)    # per shard; state=None is a cold start
    outputs, state = model.refine(frames, previous, ...)  # pass 2, only when ``passes == 2``

``frames`` is ``uint8 [T, H, W, 3]`` RGB (numpy). ``outputs`` maps each name in ``model.outputs`` to
``float32 [T, H, W, C]`` in ``[0, 1]`` (C = 1 for alpha, 3 for colour). ``state`` is ``None`` or a
flat ``dict[str, numpy.ndarray]``: it crosses process boundaries through the Ray object store and is
saved next to the shard's ledger record, so it must be plain arrays. No hidden state is kept between
calls: the same frames with the same state give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

StateMode = Literal["none", "handoff", "preroll"]
State = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


class ModelError(RuntimeError):
    """A model refused its input (clear, one-line message; not retried as a crash)."""


@dataclass(frozen=True)
class WindowSpec:
    """A model's preferred shard shape; the job's ``window`` section may override it."""

    frames: int = 64
    overlap: int = 0
    state: StateMode = "none"
    preroll: int = 0


@dataclass
class VideoContext:
    """What a model may know about the whole video when it prepares per-video conditioning."""

    url: str
    frame_count: int
    width: int
    height: int
    fps: float
    params: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)


class VideoModel:
    """Base class of every model plugin. Subclasses set the class attributes and override ``render``."""

    name: ClassVar[str] = "base"
    window: ClassVar[WindowSpec] = WindowSpec()
    outputs: ClassVar[tuple[str, ...]] = ("alpha",)
    needs_weights: ClassVar[bool] = False
    # Frames per render call: per-frame and recurrent models stream in chunks (bounded memory);
    # window models that must see the whole shard at once (diffusion) set None.
    chunk_frames: ClassVar[int | None] = 16
    # Models that read per-frame conditioning of their own (mask videos) set this: ``render`` is then
    # called with ``span=(start, stop)``, the video frame indices of ``frames``.
    takes_span: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """Check ``model.params`` without loading anything (``farm validate`` and spec parsing call it);
        raise ModelError with a one-line message naming the param. Default: accept anything."""

    def load(self, weights: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        """Load weights once per actor. Models without weights keep this no-op."""

    def prepare(self, video: VideoContext) -> Any:
        """Per-video conditioning computed once and shared by every shard (default: none)."""
        return None

    def render(self, frames: np.ndarray, cond: Any, state: State | None) -> tuple[Outputs, State | None]:
        raise NotImplementedError

    # Two-pass models (VOID: inpaint, then warped-noise refine). Pass 2 of shard i runs once pass 1 of
    # shards i-1, i and i+1 is done (a DAG, not a barrier): ``previous`` holds pass 1's outputs over the
    # shard's frames, already blended across the overlaps. Its state runs down the chain of shards:
    # ``state`` in covers the first ``shared_prev`` frames (shared with shard i-1), the returned state
    # the last ``shared_next`` frames (shared with shard i+1).
    passes: ClassVar[int] = 1

    def refine(
        self,
        frames: np.ndarray,
        previous: Outputs,
        cond: Any,
        state: State | None,
        span: tuple[int, int],
        shared_prev: int,
        shared_next: int,
    ) -> tuple[Outputs, State | None]:
        raise NotImplementedError(f"{self.name} has one pass")

    def memory_bytes(self) -> int:
        """Accelerator memory the loaded model holds (0 on the CPU); checked against the job budget."""
        return 0


def device_frames(frames: np.ndarray, device: Any) -> Any:
    """``frames`` as a torch tensor on ``device``. On CUDA the actor's pipeline has usually started that copy
    already (pinned memory, a side stream, while the previous batch computed): this waits for it on the
    current stream instead of copying again. Anything else is copied here."""
    import torch

    copy = getattr(frames, "device_copy", None)
    want = torch.device(device)
    if copy is not None and want.type == "cuda":
        if want.index is None:
            want = torch.device("cuda", torch.cuda.current_device())
        if copy.device == want:
            stream = torch.cuda.current_stream(want)
            stream.wait_event(frames.ready)  # type: ignore[attr-defined]
            copy.record_stream(stream)  # the allocator must not reuse it before this stream is done
            return copy
    return torch.from_numpy(np.asarray(frames)).to(want)


def check_state(state: State | None, expected: dict[str, tuple[int, ...]], model: str) -> None:
    """Refuse a handed-off state whose arrays do not fit this shard (e.g. another resolution)."""
    if state is None:
        return
    for key, shape in expected.items():
        if key not in state:
            raise ModelError(f"{model}: handed-off state lacks {key!r}")
        if tuple(state[key].shape) != tuple(shape):
            raise ModelError(
                f"{model}: handed-off state {key!r} has shape {tuple(state[key].shape)}, this shard needs "
                f"{tuple(shape)} (a state from a shard at another resolution or downsample ratio?)"
            )

