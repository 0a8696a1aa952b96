"""Blend the frames two adjacent shards both rendered. A pure function over arrays.

Mapping is by frame index (the tail of shard i and the head of shard i+1 cover the same indices),
never by timestamp, because some models change the frame rate.
"""

from __future__ import annotations

from typing import Any, Literal

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
    dtype = np.result_type(frames.dtype, np.float32)  # float16 overlaps in float32, float64 stays float64
    scaled = np.multiply(frames, dtype.type(255.0), dtype=dtype)  # one temporary, rounded and clipped in place
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def seam_disagreement(tail: np.ndarray, head: np.ndarray, start: int = 0) -> dict[str, Any]:
    """How far two shards' renders of the same frames disagree, measured before they are blended.

    ``tail`` and ``head`` are ``[n, H, W, C]`` in [0, 1]. Returns, in 1/255 (one 8-bit level): ``per_channel``,
    the mean absolute difference per channel over the overlap; ``mean``, their mean; ``worst_frame``, the
    video frame index (``start`` + k) where the worst channel differs most; ``worst``, that frame's value.
    A stateless model renders both copies identically (0); a visible seam is a large ``worst``.
    """
    if tail.shape != head.shape:
        raise ValueError(f"overlap shapes differ: tail {tail.shape} vs head {head.shape}")
    n = tail.shape[0]
    if n == 0:
        return {"start": start, "frames": 0, "mean": 0.0, "per_channel": [], "worst_frame": None, "worst": 0.0}
    diff = np.abs(tail.astype(np.float32) - head.astype(np.float32)) * 255.0
    per_frame = diff.reshape(n, -1, diff.shape[-1]).mean(axis=1)  # [n, C]
    channels = per_frame.mean(axis=0)
    k = int(per_frame.max(axis=1).argmax())
    return {
        "start": start,
        "frames": n,
        "mean": round(float(channels.mean()), 4),
        "per_channel": [round(float(c), 4) for c in channels],
        "worst_frame": start + k,
        "worst": round(float(per_frame[k].max()), 4),
    }


def seam_summary(seams: list[dict[str, Any]]) -> dict[str, float]:
    """Per video: ``max`` is the worst frame over all seams, ``mean`` the frame-weighted mean disagreement
    (both 1/255). No seams (one shard, or a handoff chain, which renders no frame twice) is 0."""
    frames = sum(s["frames"] for s in seams)
    if not frames:
        return {"max": 0.0, "mean": 0.0}
    return {
        "max": max(s["worst"] for s in seams),
        "mean": round(sum(s["mean"] * s["frames"] for s in seams) / frames, 4),
    }


def worst_seam(seams: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The seam with the worst frame, or None when nothing was rendered twice."""
    return max(seams, key=lambda s: s["worst"], default=None)
