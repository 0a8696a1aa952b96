"""Blend the frames two adjacent shards both rendered. A pure function over arrays.

Mapping is by frame index (the tail of shard i and the head of shard i+1 cover the same indices),
never by timestamp, because some models change the frame rate.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Ramp = Literal["linear", "cosine"]


def ramp(n: int, kind: Ramp = "linear") -> np.ndarray:
    """``float32 [n]``: the weight of the *next* shard at each overlap frame, rising strictly inside (0, 1).

    Sampled at frame centres so that neither shard's edge frame (where its context is thinnest) gets
    full weight, and the ramp is symmetric: ``w[k] + w[n-1-k] == 1``.
    """
    if n < 1:
        return np.zeros(0, dtype=np.float32)
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    if kind == "cosine":
        t = 0.5 - 0.5 * np.cos(np.pi * t)
    elif kind != "linear":
        raise ValueError(f"unknown ramp {kind!r} (linear or cosine)")
    return t.astype(np.float32)


def blend(tail: np.ndarray, head: np.ndarray, kind: Ramp = "linear") -> np.ndarray:
    """Blend ``tail`` (end of shard i) into ``head`` (start of shard i+1); both ``[n, H, W, C]`` float."""
    if tail.shape != head.shape:
        raise ValueError(f"overlap shapes differ: tail {tail.shape} vs head {head.shape}")
    w = ramp(tail.shape[0], kind).reshape(-1, *([1] * (tail.ndim - 1)))
    return (tail.astype(np.float32) * (1.0 - w) + head.astype(np.float32) * w).astype(np.float32)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """``float [..., C]`` in [0, 1] -> ``uint8`` with rounding (not truncation, which darkens by 0.5 LSB)."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
