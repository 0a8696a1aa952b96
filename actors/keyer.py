"""Chroma keyer for green and blue screens: CPU only, no weights. The quickstart's embedded default.

Alpha is a difference key (Vlahos): how much the key's dominant channel exceeds the larger of the
other two, relative to the screen's own excess ``S``. For a pixel mixing foreground and screen that
excess falls linearly with coverage, so soft edges (hair, motion blur) get soft alpha, and an unevenly
lit screen still keys because the excess barely changes with brightness. ``fgr`` is the source with
the key colour's spill suppressed (the key channel limited by the other two).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoContext, VideoModel, WindowSpec

KEY_COLOURS = {"green": (0.15, 0.68, 0.27), "blue": (0.12, 0.25, 0.75)}


class ChromaKeyer(VideoModel):
    """Params: ``key`` ("green", "blue", "auto" or [r, g, b] in 0..255); ``low`` and ``high`` as
    fractions of the screen's excess: above ``high`` of it a pixel is screen (alpha 0), below ``low``
    it is foreground (alpha 1), linear between; ``despill``."""

    name: ClassVar[str] = "keyer"
    window: ClassVar[WindowSpec] = WindowSpec(frames=48, overlap=8, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("alpha", "fgr")

    def __init__(self, key: Any = "green", low: float = 0.1, high: float = 0.9, despill: bool = True) -> None:
        super().__init__(key=key, low=low, high=high, despill=despill)
        if not 0 <= low < high <= 1:
            raise ModelError(f"keyer: need 0 <= low < high <= 1 (got low={low}, high={high})")
        self.low, self.high, self.despill = float(low), float(high), bool(despill)
        self.key = key

    def prepare(self, video: VideoContext) -> dict[str, np.ndarray]:
        """Resolve the key colour once per video, so every shard keys against the same colour."""
        key = video.params.get("key", self.key)  # a manifest row may give each video its own screen colour
        return {"key_rgb": self._key_rgb(video, key)}

    def _key_rgb(self, video: VideoContext | None, key: Any = None) -> np.ndarray:
        key = self.key if key is None else key
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
        c, (o1, o2) = _channels(key_rgb)
        screen_excess = float(key_rgb[c] - max(key_rgb[o1], key_rgb[o2]))
        if screen_excess <= 0.05:
            raise ModelError(f"keyer: key colour {np.round(key_rgb * 255).tolist()} is not a saturated screen colour")
        excess = rgb[..., c] - np.maximum(rgb[..., o1], rgb[..., o2])  # [T, H, W]
        hi, lo = self.high * screen_excess, self.low * screen_excess
        alpha = np.clip((hi - excess) / (hi - lo), 0.0, 1.0)[..., None]  # [T, H, W, 1]
        fgr = _suppress_spill(rgb, key_rgb) if self.despill else rgb
        return {"alpha": alpha.astype(np.float32), "fgr": fgr.astype(np.float32)}, None


def _suppress_spill(rgb: np.ndarray, key_rgb: np.ndarray) -> np.ndarray:
    """Limit the key's dominant channel to the larger of the other two (classic green/blue despill)."""
    c, (o1, o2) = _channels(key_rgb)
    out = rgb.copy()
    out[..., c] = np.minimum(rgb[..., c], np.maximum(rgb[..., o1], rgb[..., o2]))
    return out


def _channels(key_rgb: np.ndarray) -> tuple[int, tuple[int, int]]:
    """The key's dominant channel and the other two."""
    c = int(np.argmax(key_rgb))
    o1, o2 = (i for i in range(3) if i != c)
    return c, (o1, o2)


def _estimate_key(frame: np.ndarray) -> np.ndarray:
    """The key colour as the median of the frame's border pixels (screens fill the edges)."""
    f = frame.astype(np.float32) / 255.0
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    return np.median(border, axis=0).astype(np.float32)
