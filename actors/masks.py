"""Per-frame region masks read by frame index: a mask video, a folder of images, or one still image.

A mask is white (> 127 in luminance) inside the region. Frame ``i`` of the video is frame ``i`` of a
mask video, the ``i``-th image (sorted by name) of a folder, or the one image for every frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.base import ModelError
from farm.video import IMAGE_SUFFIXES as IMAGE_EXTS

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


def _ext(url: str) -> str:
    base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    return "." + base.rsplit(".", 1)[-1] if "." in base else ""


def _read_image(url: str, storage_options: dict[str, Any] | None) -> np.ndarray:
    """``uint8 [H, W]`` luminance of one image file."""
    from farm.video import VideoError, read_image

    try:
        return read_image(url, storage_options, mode="L")
    except VideoError as e:
        raise ModelError(f"mask {e}") from None


def _resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``bool [T, H, W]`` to ``size = (H, W)``."""
    if mask.shape[1:] == tuple(size):
        return mask
    h, w = size
    rows = np.minimum((np.arange(h) + 0.5) * mask.shape[1] / h, mask.shape[1] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * mask.shape[2] / w, mask.shape[2] - 1).astype(int)
    return mask[:, rows][:, :, cols]


def runs(indices: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive frame indices as half-open ranges, in the given order."""
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][1]:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def list_mask_images(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The image files of a mask folder, sorted by name (frame order)."""
    from farm import storage

    files = [u for u in storage.list_files(url, storage_options) if _ext(u) in IMAGE_EXTS]
    if not files:
        raise ModelError(f"mask {url!r}: no such mask video, image or folder of images")
    return files


def read_mask_frames(
    url: str,
    start: int,
    stop: int,
    size: tuple[int, int],
    storage_options: dict[str, Any] | None = None,
    indices: list[int] | None = None,
) -> np.ndarray:
    """``bool [T, H, W]`` for frames ``[start, stop)`` (or the listed ``indices``), resized to ``size``."""
    wanted = list(indices) if indices is not None else list(range(start, stop))
    ext = _ext(url)
    if ext in IMAGE_EXTS:  # one still mask for the whole video
        one = _read_image(url, storage_options)[None] > 127
        return np.repeat(_resize(one, size), len(wanted), axis=0)
    if ext in VIDEO_EXTS:
        from farm.video import VideoError, read_frames

        out = []
        try:
            for a, b in runs(wanted):  # one seek per run of consecutive frames
                for f in read_frames(url, a, b, storage_options=storage_options):
                    y = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114  # [H, W]
                    out.append(y > 127)
        except (VideoError, OSError, ValueError) as e:
            raise ModelError(f"mask {url!r}: {str(e).splitlines()[0]}") from e
        if len(out) != len(wanted):
            raise ModelError(f"mask {url!r}: has fewer frames than the video (needed frame {max(wanted)})")
        return _resize(np.stack(out), size) if out else np.zeros((0, *size), dtype=bool)
    files = list_mask_images(url, storage_options)
    if wanted and max(wanted) >= len(files):
        raise ModelError(
            f"mask folder {url!r}: has {len(files)} images, frame {max(wanted)} needs at least {max(wanted) + 1}"
        )
    frames = [_resize(_read_image(files[i], storage_options)[None] > 127, size)[0] for i in wanted]
    return np.stack(frames) if frames else np.zeros((0, *size), dtype=bool)
