"""A synthetic model with a known cost and injectable faults, for benchmarks and fault-tolerance tests.

It inverts the frames (so outputs are checkable) and can: take a fixed time per frame, as an accelerator
would, sleeping what its own small CPU work leaves of it (orchestration and accelerator benchmarks),
carry a running frame counter as state (handoff checks), and fail on purpose — on given shards' frames,
on one actor, with a simulated GPU out-of-memory above a batch size, or slowly on one actor (straggler
tests). Actors are told apart by ``FARM_ACTOR_SLOT``, which
the driver sets in each actor's environment.
"""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoModel, WindowSpec


class InjectedFault(RuntimeError):
    """A failure the test asked for (retried like any crash)."""


class SyntheticModel(VideoModel):
    """Params: ``sleep_per_frame`` (s: the wall time a call takes per frame, its inversion included);
    ``fail_on_actor`` (slot that always raises);
    ``slow_actor`` and ``slow_factor``; ``oom_above`` (raise torch's OutOfMemoryError when one call
    gets more frames than this); ``bad_input`` (raise ModelError: an input error, never retried);
    ``fail_marker`` (a path: every call raises while that file exists, a transient fault);
    ``drop_frame_marker`` (a path: the next call returns one frame too few and removes the file, a
    lost frame that segment verification must catch); ``memory_bytes`` (what ``memory_bytes()`` reports,
    to test the per-actor memory budget); ``fail_on_env`` (an environment variable: every call raises on
    processes that have it, e.g. every actor of one node of a test cluster).
    The state is a running frame count, so a handoff chain can be checked."""

    name: ClassVar[str] = "synthetic"
    window: ClassVar[WindowSpec] = WindowSpec(frames=16, overlap=0, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("alpha", "fgr")

    def __init__(
        self,
        sleep_per_frame: float = 0.0,
        fail_on_actor: int | None = None,
        slow_actor: int | None = None,
        slow_factor: float = 5.0,
        oom_above: int | None = None,
        bad_input: bool = False,
        fail_marker: str | None = None,
        drop_frame_marker: str | None = None,
        memory_bytes: int = 0,
        fail_on_env: str | None = None,
    ) -> None:
        super().__init__(sleep_per_frame=sleep_per_frame, fail_on_actor=fail_on_actor, slow_actor=slow_actor)
        self.sleep_per_frame = float(sleep_per_frame)
        self.fail_on_actor, self.slow_actor, self.slow_factor = fail_on_actor, slow_actor, float(slow_factor)
        self.oom_above, self.bad_input = oom_above, bad_input
        self.fail_marker = fail_marker  # a file: while it exists, every render raises (a transient fault)
        self.drop_frame_marker, self.held_bytes = drop_frame_marker, int(memory_bytes)
        self.fail_on_env = fail_on_env  # an environment variable set only on a "bad" node's processes

    def memory_bytes(self) -> int:
        return self.held_bytes

    @staticmethod
    def slot() -> int | None:
        value = os.environ.get("FARM_ACTOR_SLOT")
        return int(value) if value is not None else None

    def render(self, frames: np.ndarray, cond: Any, state: State | None) -> tuple[Outputs, State | None]:
        t0 = time.perf_counter()
        if self.bad_input:
            raise ModelError("synthetic: this input is refused (bad_input=true)")
        if self.fail_on_actor is not None and self.slot() == self.fail_on_actor:
            raise InjectedFault(f"synthetic: actor {self.fail_on_actor} always fails")
        if self.fail_on_env and os.environ.get(self.fail_on_env):
            raise InjectedFault(f"synthetic: {self.fail_on_env} is set on this node")
        if self.fail_marker and os.path.exists(self.fail_marker):
            raise InjectedFault(f"synthetic: fault marker {self.fail_marker} present")
        if self.oom_above is not None and len(frames) > self.oom_above:
            import torch

            raise torch.OutOfMemoryError(f"synthetic: {len(frames)} frames > oom_above={self.oom_above}")
        rgb = 1.0 - frames.astype(np.float32) / 255.0  # [T, H, W, 3]
        alpha = rgb.mean(axis=-1, keepdims=True)
        seen = int(state["frames"][0]) if state else 0
        if self.drop_frame_marker and len(frames) > 1:
            try:
                os.remove(self.drop_frame_marker)  # once: whoever removes it drops the frame
                rgb, alpha = rgb[:-1], alpha[:-1]
            except FileNotFoundError:
                pass
        delay = self.sleep_per_frame * len(frames)
        if self.slow_actor is not None and self.slot() == self.slow_actor:
            delay *= self.slow_factor
        if delay:  # a device's fixed cost: the call takes ``delay`` in all, its own small CPU work included
            time.sleep(max(0.0, delay - (time.perf_counter() - t0)))
        return {"alpha": alpha, "fgr": rgb}, {"frames": np.array([seen + len(frames)], dtype=np.int64)}


class SyntheticTwoPass(SyntheticModel):
    """A two-pass synthetic model for the scheduler's pass-2 DAG: pass 1 is the synthetic render; pass 2
    keeps pass 1's ``fgr`` (stitched across shards) and writes its "noise" as ``alpha``: one value per
    frame drawn from the shard's own start, except on the frames it shares with the previous shard, where
    the handed-off state gives it. So a seam shows whether the state went down the chain."""

    name: ClassVar[str] = "synthetic-2pass"
    window: ClassVar[WindowSpec] = WindowSpec(frames=16, overlap=4, state="none")
    passes: ClassVar[int] = 2
    chunk_frames: ClassVar[int | None] = None

    def refine(self, frames, previous, cond, state, span, shared_prev, shared_next):
        t = len(frames)
        noise = np.modf(span[0] * 0.37 + np.arange(t) * 0.11)[0].astype(np.float32)
        if shared_prev:
            if state is None or state["noise"].shape != (shared_prev,):
                raise ModelError(f"synthetic-2pass: shard at {span[0]} needs the noise of {shared_prev} shared frames")
            noise[:shared_prev] = state["noise"]
        alpha = np.broadcast_to(noise[:, None, None, None], (*frames.shape[:3], 1)).copy()
        out_state = {"noise": noise[t - shared_next :].copy()} if shared_next else None
        return {"alpha": alpha, "fgr": previous["fgr"]}, out_state
