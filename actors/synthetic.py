"""A synthetic model with a known cost and injectable faults, for benchmarks and fault-tolerance tests.

It inverts the frames (so outputs are checkable) and can: take a fixed time per frame, as an accelerator
would, sleeping what its own small CPU work leaves of it (orchestration and accelerator benchmarks),
carry a running frame counter as state (handoff checks), and fail on purpose — on given shards' frames,
on one actor, with a simulated GPU out-of-memory above a batch size, or slowly on one actor (straggler
tests). Actors are told apart by their pool slot, read from the Ray actor name the driver gives each
actor (``<job>/actor-<slot>``).
"""

from __future__ import annotations

import os
import re
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
    processes that have it, e.g. every actor of one node of a test cluster); ``fail_once_marker`` (a path:
    the next call raises and removes the file, one failed and retried shard); ``shard_offset`` with
    ``shard_stride`` (levels of 1/255, frames between shard starts: every other shard's outputs move
    ``shard_offset`` levels towards mid-grey, so each seam disagrees by exactly that much; meant for
    windows of at most ``chunk_frames`` frames, where one render call is one shard).
    The state is a running frame count, so a handoff chain can be checked."""

    name: ClassVar[str] = "synthetic"
    window: ClassVar[WindowSpec] = WindowSpec(frames=16, overlap=0, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("alpha", "fgr")
    takes_span: ClassVar[bool] = True  # the frame indices tell which shard a call renders (shard_offset)

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
        shard_offset: float = 0.0,
        shard_stride: int | None = None,
        fail_once_marker: str | None = None,
    ) -> None:
        super().__init__(sleep_per_frame=sleep_per_frame, fail_on_actor=fail_on_actor, slow_actor=slow_actor)
        self.sleep_per_frame = float(sleep_per_frame)
        self.fail_on_actor, self.slow_actor, self.slow_factor = fail_on_actor, slow_actor, float(slow_factor)
        self.oom_above, self.bad_input = oom_above, bad_input
        self.fail_marker = fail_marker  # a file: while it exists, every render raises (a transient fault)
        self.drop_frame_marker, self.held_bytes = drop_frame_marker, int(memory_bytes)
        self.fail_on_env = fail_on_env  # an environment variable set only on a "bad" node's processes
        self.fail_once_marker = fail_once_marker
        if shard_offset and not shard_stride:
            raise ModelError("synthetic: shard_offset needs shard_stride (frames between shard starts)")
        self.shard_offset, self.shard_stride = float(shard_offset) / 255.0, shard_stride

    def memory_bytes(self) -> int:
        return self.held_bytes

    @staticmethod
    def slot() -> int | None:
        """The pool slot of the actor this runs in, from its Ray actor name (``<job>/actor-<slot>[-r<n>]``)."""
        import sys

        ray = sys.modules.get("ray")  # only inside a Ray worker: in-process use has no slot
        name = ray.get_runtime_context().get_actor_name() if ray is not None and ray.is_initialized() else None
        m = re.search(r"/actor-(\d+)", name or "")
        return int(m.group(1)) if m else None

    def render(
        self, frames: np.ndarray, cond: Any, state: State | None, span: tuple[int, int] | None = None
    ) -> tuple[Outputs, State | None]:
        t0 = time.perf_counter()
        if self.bad_input:
            raise ModelError("synthetic: this input is refused (bad_input=true)")
        if self.fail_on_actor is not None and self.slot() == self.fail_on_actor:
            raise InjectedFault(f"synthetic: actor {self.fail_on_actor} always fails")
        if self.fail_on_env and os.environ.get(self.fail_on_env):
            raise InjectedFault(f"synthetic: {self.fail_on_env} is set on this node")
        if self.fail_marker and os.path.exists(self.fail_marker):
            raise InjectedFault(f"synthetic: fault marker {self.fail_marker} present")
        if self.fail_once_marker:
            try:
                os.remove(self.fail_once_marker)  # once: whoever removes it fails
                raise InjectedFault(f"synthetic: fault marker {self.fail_once_marker} (once)")
            except FileNotFoundError:
                pass
        if self.oom_above is not None and len(frames) > self.oom_above:
            import torch

            raise torch.OutOfMemoryError(f"synthetic: {len(frames)} frames > oom_above={self.oom_above}")
        rgb, alpha = invert(frames)
        if self.shard_offset and span is not None and (span[0] // self.shard_stride) % 2:
            o = self.shard_offset
            rgb, alpha = (np.where(x < 0.5, x + o, x - o) for x in (rgb, alpha))
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


def invert(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``1 - frames/255`` as fgr and its channel mean as alpha, float32, computed from the uint8 inversion
    with in-place steps: about 0.01 CPU-s per 720p frame instead of 0.06, so that a model standing for an
    accelerator leaves the CPU to the pipeline's decoder and encoders."""
    inverse = 255 - frames  # uint8
    rgb = inverse.astype(np.float32)
    rgb *= np.float32(1 / 255)
    total = inverse[..., 0].astype(np.uint16)
    total += inverse[..., 1]
    total += inverse[..., 2]
    alpha = total[..., None].astype(np.float32)
    alpha *= np.float32(1 / 765)
    return rgb, alpha


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
