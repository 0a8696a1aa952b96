"""Output channels made from a model's outputs: alpha, fgr, comp (over a colour, image or video), rgb, rgba."""

from __future__ import annotations

from typing import Any

import numpy as np

from farm.errors import one_line
from farm.video import IMAGE_SUFFIXES, VideoError, read_image

# channel -> (model outputs it needs, components)
CHANNEL_NEEDS: dict[str, tuple[tuple[str, ...], int]] = {
    "alpha": (("alpha",), 1),
    "fgr": (("fgr",), 3),
    "comp": (("alpha", "fgr"), 3),
    "rgb": (("rgb",), 3),
    "rgba": (("alpha", "fgr"), 4),
}


def missing_outputs(channel: str, model_outputs: tuple[str, ...]) -> list[str]:
    """The model outputs a channel needs that this model does not produce."""
    needs, _ = CHANNEL_NEEDS[channel]
    if channel == "comp" and "comp" in model_outputs:
        return []
    return [n for n in needs if n not in model_outputs]


def components(channel: str) -> int:
    return CHANNEL_NEEDS[channel][1]


class BackgroundError(ValueError):
    """A background image or video that cannot be read (an input error: retrying cannot help)."""


class Background:
    """What ``comp`` goes over: a colour, an image, or a video (a clean plate), at the output's size.

    Images and video frames are resized (bilinear) to the frame size. A video is read frame-accurately
    for the frames asked, streaming forward while requests are contiguous (one decoder per shard); a
    background video shorter than the input loops.
    """

    def __init__(self, source: Any, width: int, height: int, storage_options: dict[str, Any] | None = None):
        self.source, self.size, self.so = source, (int(width), int(height)), storage_options or {}
        self._colour: np.ndarray | None = None
        self._image: np.ndarray | None = None
        self._frames = 0
        self._reader: Any = None
        self._next = -1
        if not isinstance(source, str):
            self._colour = np.asarray(source, dtype=np.float32).reshape(1, 1, 1, 3)
        elif source.lower().endswith(IMAGE_SUFFIXES):
            try:
                self._image = self._fit(read_image(source, self.so))[None]
            except VideoError as e:
                raise BackgroundError(f"output.background {e}") from None
        else:
            from farm.video import probe

            try:
                self._frames = probe(source, self.so).frame_count
            except Exception as e:  # noqa: BLE001 - any failure to open it is the same input error
                why = one_line(e, named=False)
                raise BackgroundError(f"output.background {source!r}: cannot read ({why})") from None
            if self._frames < 1:
                raise BackgroundError(f"output.background {source!r}: has no video frames")

    def _fit(self, rgb: np.ndarray) -> np.ndarray:
        """``uint8 [h, w, 3]`` -> ``float32 [H, W, 3]`` in [0, 1] at the output size."""
        from PIL import Image

        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = np.asarray(Image.fromarray(rgb).resize(self.size, Image.Resampling.BILINEAR))
        return rgb.astype(np.float32) / 255.0

    def frames(self, start: int, stop: int) -> np.ndarray:
        """``float32 [T|1, H, W, 3]`` for video frames [start, stop) of the input."""
        if self._colour is not None:
            return self._colour
        if self._image is not None:
            return self._image
        return np.stack([self._video_frame(i % self._frames) for i in range(start, stop)])

    def _video_frame(self, i: int) -> np.ndarray:
        from farm.video import read_frames

        if self._reader is None or i != self._next:
            if self._reader is not None:
                self._reader.close()
            self._reader = read_frames(self.source, i, self._frames, storage_options=self.so)
        self._next = i + 1
        return self._fit(next(self._reader))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None



def channel_frames(
    outputs: dict[str, np.ndarray], channel: str, background: Background | Any = (0.0, 0.0, 0.0), start: int = 0
) -> np.ndarray:
    """``float32 [T, H, W, C]`` in [0, 1] for one channel; ``start`` is the video index of frame 0
    (it picks the frames of a background video)."""
    if channel in ("alpha", "fgr", "rgb"):
        return outputs[channel]
    if channel == "comp":
        if "comp" in outputs:
            return outputs["comp"]
        if isinstance(background, Background):
            bg = background.frames(start, start + len(outputs["alpha"]))
        else:
            bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 1, 3)
        return outputs["fgr"] * outputs["alpha"] + bg * (1.0 - outputs["alpha"])
    if channel == "rgba":
        return np.concatenate([outputs["fgr"], outputs["alpha"]], axis=-1)
    raise ValueError(f"unknown channel {channel!r}")
