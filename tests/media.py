"""Small video files, good and bad, written with PyAV for the reliability tests (no ffmpeg binary)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def numbered(i: int, h: int, w: int) -> np.ndarray:
    """``uint8 [H, W, 3]``: frame number i drawn as 8 bars (one bit each), so lost frames show."""
    img = np.zeros((h, w, 3), np.uint8)
    for b in range(8):
        img[:, b * w // 8 : (b + 1) * w // 8] = 255 if (i >> b) & 1 else 0
    img[..., 1] = (np.arange(w)[None, :] * 255 // max(w - 1, 1)).astype(np.uint8)  # a gradient: colour varies
    return img


def write_video(
    path: str | Path,
    n: int = 24,
    size: tuple[int, int] = (64, 48),
    *,
    pix_fmt: str = "yuv420p",
    fmt: str | None = None,
    pts: list[int] | None = None,
    rotation: int | None = None,
    gop: int = 8,
) -> str:
    """An H.264 clip of ``n`` numbered frames; ``pts`` (in 1/24 s) makes it variable frame rate."""
    w, h = size
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=24, options={"g": str(gop), "bf": "0", "crf": "18"})
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.time_base = Fraction(1, 24)
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            vf = av.VideoFrame.from_ndarray(numbered(i, h, w), format="rgb24")
            vf.pts = pts[i] if pts is not None else i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return str(path)


def write_audio_only(path: str | Path, seconds: float = 0.5) -> str:
    """An .mp4 holding one AAC track and no video."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=48000, layout="mono")
        t = np.arange(int(48000 * seconds)) / 48000
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # [1, N]
        for k in range(0, samples.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, k : k + 1024]), format="flt", layout="mono")
            f.sample_rate = 48000
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return str(path)


def truncate(src: str, dst: str | Path, keep: float = 0.5) -> str:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return str(dst)


def corrupt_middle(src: str, dst: str | Path, at: float = 0.3, seed: int = 0) -> str:
    """Overwrite 512 bytes at ``at`` of the file with random bytes (damaged packets mid-stream; an mp4
    written by PyAV keeps its index at the end, so the container still opens)."""
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    a = int(len(data) * at)
    data[a : a + 512] = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return str(dst)
