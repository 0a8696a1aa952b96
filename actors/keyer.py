"""Chroma keyer for green and blue screens: CPU only, no weights. The quickstart's embedded default.

Alpha comes from the distance to the key colour in the CbCr plane (brightness-independent, so an
unevenly lit screen still keys), mapped through a smooth ramp between two thresholds. ``fgr`` is the
source with the key colour's spill suppressed (the key channel limited by the other two).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoContext, VideoModel, WindowSpec

KEY_COLOURS = {"green": (0.0, 0.7, 0.25), "blue": (0.1, 0.2, 0.75)}

# BT.601 RGB -> (Cb, Cr), values in [0,1] in, roughly [-0.5, 0.5] out.
_CBCR = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32).T


def _cbcr(rgb: np.ndarray) -> np.ndarray:
    """``float32 [..., 3]`` RGB in [0,1] -> ``[..., 2]`` chroma."""
    return rgb @ _CBCR


class ChromaKeyer(VideoModel):
    """Params: ``key`` ("green", "blue", "auto" or [r, g, b] in 0..255), ``low`` and ``high``
    (chroma distances: at or below ``low`` alpha is 0, at or above ``high`` it is 1), ``despill``."""

    name: ClassVar[str] = "keyer"
    window: ClassVar[WindowSpec] = WindowSpec(frames=48, overlap=8, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("alpha", "fgr")

    def __init__(self, key: Any = "green", low: float = 0.12, high: float = 0.22, despill: bool = True) -> None:
        super().__init__(key=key, low=low, high=high, despill=despill)
        if not 0 <= low < high:
            raise ModelError(f"keyer: need 0 <= low < high (got low={low}, high={high})")
        self.low, self.high, self.despill = float(low), float(high), bool(despill)
        self.key = key

    def prepare(self, video: VideoContext) -> dict[str, np.ndarray]:
        """Resolve the key colour once per video, so every shard keys against the same colour."""
        return {"key_rgb": self._key_rgb(video)}

    def _key_rgb(self, video: VideoContext | None) -> np.ndarray:
        key = self.key
        if isinstance(key, str) and key in KEY_COLOURS:
            return np.asarray(KEY_COLOURS[key], dtype=np.float32)
        if isinstance(key, (list, tuple)) and len(key) == 3:
            return np.asarray(key, dtype=np.float32) / 255.0
        if key == "auto":
            if video is None:
                raise ModelError("keyer: key=auto needs the video (prepare was not run)")
            from farm.video import read_frames

            frame = next(iter(read_frames(video.url, 0, 1, storage_options=video.storage_options)))
            return _estimate_key(frame)
        raise ModelError(f"keyer: key must be green, blue, auto or [r, g, b] (got {key!r})")

    def render(self, frames: np.ndarray, cond: Any, state: State | None) -> tuple[Outputs, State | None]:
        key_rgb = cond["key_rgb"] if cond else self._key_rgb(None)
        rgb = frames.astype(np.float32) / 255.0  # [T, H, W, 3]
        key_chroma = _cbcr(key_rgb)  # [2]
        dist = np.linalg.norm(_cbcr(rgb) - key_chroma, axis=-1, keepdims=True)  # [T, H, W, 1]
        x = np.clip((dist - self.low) / (self.high - self.low), 0.0, 1.0)
        alpha = x * x * (3.0 - 2.0 * x)  # smoothstep: soft edges without a kink at the thresholds
        fgr = _suppress_spill(rgb, key_rgb) if self.despill else rgb
        return {"alpha": alpha.astype(np.float32), "fgr": fgr.astype(np.float32)}, None


def _suppress_spill(rgb: np.ndarray, key_rgb: np.ndarray) -> np.ndarray:
    """Limit the key's dominant channel to the larger of the other two (classic green/blue despill)."""
    c = int(np.argmax(key_rgb))
    others = [i for i in range(3) if i != c]
    out = rgb.copy()
    out[..., c] = np.minimum(rgb[..., c], np.maximum(rgb[..., others[0]], rgb[..., others[1]]))
    return out


def _estimate_key(frame: np.ndarray) -> np.ndarray:
    """The key colour as the median of the frame's border pixels (screens fill the edges)."""
    f = frame.astype(np.float32) / 255.0
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    return np.median(border, axis=0).astype(np.float32)
