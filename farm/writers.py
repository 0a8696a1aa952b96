"""What runs behind the model in an actor's pipeline: a writer per output channel of a shard (channel
conversion, overlap frames for the stitcher, the core piece's encoder), or pass 1's whole-window keeper.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from farm import storage
from farm.channels import Background, channel_frames
from farm.ledger import Ledger
from farm.sinks import SinkError
from farm.stitch import to_uint8

ShardTask = Any  # farm.worker.ShardTask (not imported: the worker imports this module)


class ChannelWriter:
    """One output channel of one shard, behind the model: converts the model's outputs to the channel,
    keeps the overlap frames (float16) for the stitcher and encodes the core frames into the shard's piece."""

    def __init__(
        self, channel: str, sink: Any, task: ShardTask, background: Background | None, writing: Any, threads: int
    ) -> None:
        s = task.shard
        self.channel, self.task, self.background, self.writing = channel, task, background, writing
        k = task.resume_from  # a continuation of a checkpointed shard: its own piece from frame k
        name = f"core-{s.index:04d}{task.tag}" + (f"-k{k:06d}" if k is not None else "")
        self.piece = sink.open_piece(name, s.core_start if k is None else k, threads=threads)
        self.heads: list[np.ndarray] = []
        self.tails: list[np.ndarray] = []
        self.stopped_at: int | None = None  # set before ``finish`` when the shard stops at a checkpoint

    def span(self) -> tuple[int, int, int, int]:
        """(first core frame, end of the core, head frames, tail frames) this attempt must have written: the
        plan's, cut where it resumed (no head) and where it was checkpointed (no tail)."""
        s, k = self.task.shard, self.task.resume_from
        lo, hi = (s.core_start, s.core_stop) if k is None else (k, s.core_stop)
        head = s.core_start - s.start if k is None else 0
        if self.stopped_at is not None:
            return lo, self.stopped_at, head, 0
        return lo, hi, head, s.stop - s.core_stop

    def write(self, item: tuple[int, int, dict[str, np.ndarray]]) -> None:
        a, b, outputs = item
        s = self.task.shard
        with self.writing(self.task):
            out = channel_frames(outputs, self.channel, self.background, start=a)  # [t, H, W, C] float32
            for lo, hi, dest in ((s.start, s.core_start, self.heads), (s.core_stop, s.stop, self.tails)):
                if max(a, lo) < min(b, hi):
                    dest.append(out[max(a, lo) - a : min(b, hi) - a].astype(np.float16))
            lo, hi = max(a, s.core_start), min(b, s.core_stop)
            if lo < hi:
                self.piece.write(to_uint8(out[lo - a : hi - a]))

    def finish(self) -> dict[str, Any]:
        task, s = self.task, self.task.shard
        lo, hi, head, tail = self.span()
        with self.writing(task):
            entry: dict[str, Any] = {"core": self.piece.close()}
            if entry["core"]["frames"] != hi - lo:  # the plan, not what the model returned
                raise SinkError(
                    f"{task.name}: {self.channel} segment has {entry['core']['frames']} frames, the plan says "
                    f"{hi - lo} (frames lost between model and encoder)"
                )
            for side, parts, want in (("head", self.heads, head), ("tail", self.tails, tail)):
                got = sum(len(p) for p in parts)
                if got != want:  # the stitcher blends these with the neighbour's: a short one fails the video
                    raise SinkError(
                        f"{task.name}: {self.channel} {side} overlap has {got} frames, the plan says {want} "
                        "(frames lost between model and encoder)"
                    )
                if parts:
                    url = storage.join(task.targets[self.channel].parts_url, f"{s.name}{task.tag}.{side}.npz")
                    entry[side] = Ledger(task.ledger_root, task.storage_options).write_arrays(
                        url, {"frames": np.concatenate(parts)}
                    )
        return entry

    def discard(self) -> None:
        self.piece.discard()


class WholeKeeper:
    """Pass 1 of a two-pass model: keeps the whole window's outputs (uint8) and saves them for pass 2."""

    def __init__(self, task: ShardTask, writing: Any) -> None:
        self.task, self.writing = task, writing
        self.whole: dict[str, list[np.ndarray]] = {}

    def write(self, item: tuple[int, int, dict[str, np.ndarray]]) -> None:
        a, _, outputs = item
        for k, v in outputs.items():
            self.whole.setdefault(k, []).append(to_uint8(v[max(a, self.task.shard.start) - a :]))

    def finish(self) -> str:
        t = self.task
        arrays = {k: np.concatenate(v) for k, v in self.whole.items()}
        with self.writing(t):
            return Ledger(t.ledger_root, t.storage_options).write_pass1(t.video_key, f"{t.shard.name}{t.tag}", arrays)

    def discard(self) -> None:
        self.whole.clear()
