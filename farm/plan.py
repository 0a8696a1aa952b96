"""Split a video into overlapping temporal windows (shards).

Pure arithmetic over half-open frame ranges: no Ray, no torch, no I/O, so every edge is unit-tested.

A shard renders ``[start, stop)``. Adjacent shards share ``overlap`` frames, which the stitcher blends;
``[core_start, core_stop)`` are the frames only this shard renders. With ``preroll`` the shard first
runs ``preroll`` frames before ``start`` (clamped at frame 0) and discards them, to warm recurrent state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


class PlanError(ValueError):
    """A window that cannot tile a video."""


@dataclass(frozen=True)
class Shard:
    video: str  # the video's key in the job (stable, filesystem-safe)
    index: int
    start: int
    stop: int
    core_start: int
    core_stop: int
    preroll: int = 0  # frames actually run before `start` (already clamped at 0)
    stage: int = 0  # two-pass models: 0 renders (pass 1), 1 refines pass 1's output (pass 2)

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def head(self) -> tuple[int, int]:
        """Frames shared with the previous shard: ``[start, core_start)``."""
        return self.start, self.core_start

    @property
    def tail(self) -> tuple[int, int]:
        """Frames shared with the next shard: ``[core_stop, stop)``."""
        return self.core_stop, self.stop

    @property
    def name(self) -> str:
        return f"{'refine' if self.stage else 'shard'}-{self.index:04d}"

    def to_dict(self) -> dict:
        return asdict(self)


def plan_shards(video: str, frame_count: int, frames: int, overlap: int = 0, preroll: int = 0) -> list[Shard]:
    """Tile ``frame_count`` frames with windows of ``frames`` frames sharing ``overlap`` frames.

    Each frame is rendered by at most two shards (``2 * overlap <= frames``), so a blend is always
    between a tail and the next head. The last shard may be shorter; a video shorter than one
    window is one shard.
    """
    if frame_count < 1:
        raise PlanError(f"video has no frames ({frame_count})")
    if frames < 1:
        raise PlanError(f"window.frames must be at least 1 ({frames})")
    if overlap < 0:
        raise PlanError(f"window.overlap must not be negative ({overlap})")
    if overlap >= frames:
        raise PlanError(f"window.overlap must be smaller than window.frames ({overlap} >= {frames})")
    if 2 * overlap > frames:
        raise PlanError(
            f"window.overlap must be at most half of window.frames ({overlap} > {frames // 2}), "
            "so that no frame is rendered by three shards"
        )
    if preroll < 0:
        raise PlanError(f"window.preroll must not be negative ({preroll})")

    ranges: list[tuple[int, int]] = []
    start = 0
    while True:
        stop = min(start + frames, frame_count)
        ranges.append((start, stop))
        if stop >= frame_count:
            break
        start = stop - overlap

    shards = []
    for i, (start, stop) in enumerate(ranges):
        core_start = ranges[i - 1][1] if i > 0 else start
        core_stop = ranges[i + 1][0] if i + 1 < len(ranges) else stop
        shards.append(
            Shard(
                video=video,
                index=i,
                start=start,
                stop=stop,
                core_start=core_start,
                core_stop=core_stop,
                preroll=min(preroll, start),
            )
        )
    return shards


def output_pieces(shards: list[Shard]) -> list[tuple[str, int, int, int]]:
    """The ordered pieces of the final output: ``("core", shard, start, stop)`` for each shard's own
    frames and ``("blend", shard, start, stop)`` for the overlap of ``shard`` with ``shard + 1``.
    Empty pieces are left out. Concatenated, they cover ``[0, frame_count)`` exactly once."""
    pieces = []
    for s in shards:
        if s.core_stop > s.core_start:
            pieces.append(("core", s.index, s.core_start, s.core_stop))
        if s.index + 1 < len(shards) and s.stop > s.core_stop:
            pieces.append(("blend", s.index, s.core_stop, s.stop))
    return pieces


def refine_shards(shards: list[Shard]) -> list[Shard]:
    """Pass 2 of a two-pass model: the same windows again, as stage 1 (``refine-i`` after ``shard-i``)."""
    return [replace(s, stage=1, preroll=0) for s in shards]


def resolve_window(spec: Any, model_cls: Any) -> tuple[str, int, int, int]:
    """(state mode, frames, overlap, preroll): the job's ``window`` over the model's defaults."""
    w, d = spec.window, model_cls.window
    mode = w.state if w.state != "auto" else d.state
    frames = w.frames or d.frames
    overlap = w.overlap if w.overlap is not None else d.overlap
    if mode == "handoff":
        overlap = 0  # the state carries the context exactly: overlapping would only render frames twice
    preroll = w.preroll if mode == "preroll" else 0
    return mode, frames, overlap, preroll
