"""A synthetic chroma-key clip with ground-truth alpha, so keyers and matting models can be scored.

A person-like figure (head, hair, torso with a striped shirt, a swinging arm) drifts across a slightly
uneven key screen (gentle gradient + small noise, as lit screens are). Edges are feathered over a few
pixels, so the truth has soft values as real mattes do. The figure's palette (skin, red shirt, dark
hair, grey trousers) stays far from both key colours.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Literal

import av
import numpy as np

KEY_RGB = {"green": (40, 175, 70), "blue": (35, 70, 190)}  # screen colour at its centre
FEATHER = 3.0  # px over which an edge goes from opaque to clear

# (name, rgb) from back to front
_PALETTE = {
    "trousers": (95, 92, 100),
    "shirt": (190, 55, 50),
    "arm": (200, 150, 120),
    "skin": (222, 172, 140),
    "hair": (60, 40, 30),
}


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """``float32 [H, W]`` coverage of an ellipse with a feathered edge (about FEATHER px wide)."""
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)  # 1 on the outline
    d = (r - 1.0) * min(rx, ry)  # ~signed distance in px
    return np.clip(0.5 - d / FEATHER, 0.0, 1.0).astype(np.float32)


def _figure(t: int, n: int, w: int, h: int, phase: float) -> list[tuple[np.ndarray, str]]:
    """The figure's layers at frame ``t`` as (coverage [H, W], palette name), back to front."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(w, h)
    cx = w * (0.5 + 0.22 * np.sin(2 * np.pi * t / max(n, 1) + phase))  # drifts left and right
    bob = 0.015 * s * np.sin(4 * np.pi * t / max(n, 1))
    head_y = h * 0.28 + bob
    swing = 0.5 * np.sin(2 * np.pi * 2 * t / max(n, 1) + phase)  # arm angle, radians
    ax = cx + 0.20 * s + 0.12 * s * np.sin(swing)
    ay = h * 0.58 + 0.12 * s * np.cos(swing)
    return [
        (_ellipse(xx, yy, cx, h * 0.92, 0.16 * s, 0.22 * s), "trousers"),
        (_ellipse(xx, yy, cx, h * 0.62 + bob, 0.20 * s, 0.24 * s), "shirt"),
        (_ellipse(xx, yy, ax, ay, 0.05 * s, 0.14 * s), "arm"),
        (_ellipse(xx, yy, cx, head_y, 0.10 * s, 0.13 * s), "skin"),
        (_ellipse(xx, yy, cx, head_y - 0.08 * s, 0.10 * s, 0.06 * s), "hair"),
    ]


def _render(
    t: int, n: int, w: int, h: int, key: str, rng: np.random.Generator, texture: np.ndarray, phase: float
) -> tuple[np.ndarray, np.ndarray]:
    """One frame: ``uint8 [H, W, 3]`` RGB and ``uint8 [H, W]`` alpha."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    k = np.asarray(KEY_RGB[key], np.float32)
    grad = 1.0 + 0.06 * (xx / w - 0.5) - 0.05 * (yy / h - 0.5)  # uneven lighting, [H, W]
    screen = k[None, None] * grad[..., None] + rng.normal(0, 2.0, (h, w, 3)).astype(np.float32)
    fg = np.zeros((h, w, 3), np.float32)  # premultiplied colour
    alpha = np.zeros((h, w), np.float32)
    for cov, name in _figure(t, n, w, h, phase):
        col = np.asarray(_PALETTE[name], np.float32)[None, None] * texture[..., None]  # [H, W, 3]
        if name == "shirt":  # stripes that move with the figure, so the foreground has texture
            col = col * (0.85 + 0.15 * (np.sin(yy * 0.6) > 0))[..., None]
        fg = col * cov[..., None] + fg * (1 - cov[..., None])
        alpha = cov + alpha * (1 - cov)
    a8 = np.rint(alpha * 255).astype(np.uint8)
    a = a8.astype(np.float32)[..., None] / 255  # composite with the quantised truth, so truth == frame
    colour = fg / np.maximum(alpha[..., None], 1e-6)  # un-premultiplied foreground, [H, W, 3]
    rgb = colour * a + screen * (1 - a)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), a8


def write_sample(
    path: str,
    frames: int = 96,
    width: int = 320,
    height: int = 240,
    fps: Fraction = Fraction(24),
    key: Literal["green", "blue"] = "green",
    seed: int = 0,
    audio: bool = True,
) -> tuple[str, str]:
    """Write the clip (H.264 mp4, crf 10, + a 440 Hz AAC tone) and ``<stem>.alpha.npz``; returns both paths.

    Deterministic for a seed (the noise is drawn from it; x264 is deterministic for fixed settings).
    """
    if key not in KEY_RGB:
        raise ValueError(f"key must be one of {sorted(KEY_RGB)}, not {key!r}")
    fps = Fraction(fps)
    rng = np.random.default_rng(seed)
    texture = (1.0 + 0.06 * rng.standard_normal((height, width))).astype(
        np.float32
    )  # [H, W] skin/cloth grain
    phase = float(rng.uniform(0, 2 * np.pi))
    alphas = np.zeros((frames, height, width), np.uint8)  # [T, H, W]
    odd = width % 2 or height % 2
    with av.open(path, "w", format="mp4") as c:
        v = c.add_stream("libx264", rate=fps, options={"crf": "10", "preset": "medium", "threads": "1"})
        v.width, v.height, v.pix_fmt = width, height, "yuv444p" if odd else "yuv420p"
        v.time_base = Fraction(1) / fps
        v.color_range, v.colorspace = 1, 1  # BT.709 limited, as farm's own segments
        a = None
        if audio:
            a = c.add_stream("aac", rate=48000, layout="mono")
        for t in range(frames):
            rgb, alphas[t] = _render(t, frames, width, height, key, rng, texture, phase)
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf = vf.reformat(format=v.pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
            vf.pts = t
            c.mux(v.encode(vf))
        c.mux(v.encode(None))
        if a is not None:
            sr = 48000
            n = int(round(frames / fps * sr))
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)[None]  # [1, N]
            for i in range(0, n, 1024):
                af = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(tone[:, i : i + 1024]), format="fltp", layout="mono"
                )
                af.sample_rate, af.pts, af.time_base = sr, i, Fraction(1, sr)
                c.mux(a.encode(af))
            c.mux(a.encode(None))
    alpha_path = os.path.splitext(path)[0] + ".alpha.npz"
    np.savez_compressed(alpha_path, alpha=alphas)
    return path, alpha_path


def read_alpha_truth(path: str) -> np.ndarray:
    """``uint8 [T, H, W]`` ground-truth alpha; accepts the clip's path or the ``.alpha.npz`` itself."""
    if not path.endswith(".alpha.npz"):
        path = os.path.splitext(path)[0] + ".alpha.npz"
    with np.load(path) as z:
        return z["alpha"]
