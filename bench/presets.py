"""x264 presets for farm's mp4 outputs: CPU per frame, file size and fidelity, each against ``medium``.

On a GPU node the encoders run on the CPU (H100/H200-class GPUs have no video encoder), beside the decoder,
while the GPU waits for nothing else; so the preset decides how many CPU seconds each rendered frame costs.
Each preset encodes the same frames with farm's own ``SegmentWriter`` at farm's default CRF (16), one encoder
thread, in this process (its CPU time is the encoder's): ``fgr`` is cockatoo 720p (real footage), ``alpha``
the ground-truth matte of a 1280x720 ``farm sample`` clip (hard edges, soft hair-like ramps, flat regions,
as a matte is). Fidelity is PSNR and the largest error against the frames encoded, decoded back by farm's
reader. The baseline is x264's own default, ``medium``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from fractions import Fraction
from typing import Any

import numpy as np

from bench.common import SHARED_VIDEOS, machine, machine_line, parse_args, write_result

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "medium")
CRF = 16  # farm's default output.quality


def frames_of(kind: str, n: int, tmp: str) -> np.ndarray:
    """``uint8 [n, 720, 1280, C]``: cockatoo's frames (fgr) or a sample clip's true matte (alpha)."""
    from farm.video import read_frames

    if kind == "fgr":
        return np.stack(list(read_frames(str(SHARED_VIDEOS / "cockatoo.mp4"), 0, n)))
    from farm.sample import read_alpha_truth, write_sample

    clip, _ = write_sample(os.path.join(tmp, "sample.mp4"), frames=n, width=1280, height=720, audio=False)
    return read_alpha_truth(clip)[..., None]  # [n, H, W, 1]


def encode(frames: np.ndarray, preset: str, path: str) -> dict[str, Any]:
    from farm.encode import SegmentWriter
    from farm.video import read_frames

    n, h, w, c = frames.shape
    writer = SegmentWriter(path, Fraction(25), w, h, format="mp4", channels=c, quality=CRF, preset=preset, threads=1)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for f in frames:
        writer.write(f)
    writer.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    back = np.stack(list(read_frames(path, 0, n)))[..., :c]
    err = back.astype(np.int16) - frames.astype(np.int16)
    mse = float(np.mean(err.astype(np.float64) ** 2))
    return {
        "cpu_s_per_frame": round(cpu / n, 4),
        "wall_s_per_frame": round(wall / n, 4),
        "mb": round(os.path.getsize(path) / 1e6, 3),
        "psnr_db": round(10 * math.log10(255**2 / mse), 2) if mse else None,
        "max_abs_error": int(np.abs(err).max()),
    }


def main() -> None:
    args = parse_args(__doc__)
    m = machine()
    n = 24 if args.quick else 120
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="farm-presets-") as tmp:
        for kind in ("fgr", "alpha"):
            frames = frames_of(kind, n, tmp)
            rows = {p: encode(frames, p, os.path.join(tmp, f"{kind}-{p}.mp4")) for p in PRESETS}
            base = rows["medium"]
            for p, r in rows.items():
                r["cpu_vs_medium"] = round(r["cpu_s_per_frame"] / base["cpu_s_per_frame"], 3)
                r["size_vs_medium"] = round(r["mb"] / base["mb"], 3)
                print(f"{kind} {p}: {r}", flush=True)
            out[kind] = rows
    write_result(
        "presets",
        {
            "machine": m,
            "machine_line": machine_line(m),
            "what": f"x264 at CRF {CRF}, one thread, {n} frames of 1280x720: fgr = cockatoo.mp4, alpha = the "
            "true matte of a farm sample clip; farm's SegmentWriter and reader",
            "baseline": "medium (x264's default)",
            "frames": n,
            "results": out,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
