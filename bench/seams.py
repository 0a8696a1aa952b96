"""Seams of a recurrent model: RVM over shards with state handoff vs preroll, against one single pass.

A shard that starts mid-video without the previous frames' GRU state is a cold start: its first frames
differ from a single pass until the state settles. ``handoff`` passes shard i's final state to shard
i+1 (serial chain, exact); ``preroll K`` runs each shard K frames early and discards them (parallel,
K extra frames per shard, approximate). This measures both on a real clip with seeded-random and
trained weights, through the model adapter directly (no Ray: the driver's handoff is tested in
tests/test_recurrent_farm.py).

Figures (alpha in [0, 1]): mean and max |alpha - single pass| over the seam frames (the first
``SEAM`` frames of every shard after the first) and over all frames; dtSSD, the temporal-coherence
error of the video matting literature, ``sqrt(mean(((a_t - a_{t-1}) - (g_t - g_{t-1}))^2))`` per
frame with g the single-pass alpha, averaged over the seam frames.

    python -m bench.seams [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import SHARED_VIDEOS, machine, write_result

SHARD = 30  # frames per shard
SEAM = 5  # frames after each shard start that count as seam frames
PREROLLS = (0, 8, 30)
SEEDED = Path(SHARED_VIDEOS).parent / "reference" / "rvm" / "rvm_mobilenetv3_random.pth"


def seam_frames(total: int, shard: int = SHARD, seam: int = SEAM) -> list[int]:
    return [t for s in range(shard, total, shard) for t in range(s, min(s + seam, total))]


def errors(alpha: np.ndarray, ref: np.ndarray, seams: list[int]) -> dict[str, float]:
    """alpha, ref: float32 [T, H, W, 1] in [0, 1]."""
    diff = np.abs(alpha - ref)
    dt = (alpha[1:] - alpha[:-1]) - (ref[1:] - ref[:-1])  # [T-1, ...]: dt[t-1] is the step into frame t
    dtssd = np.sqrt((dt.astype(np.float64) ** 2).reshape(len(dt), -1).mean(axis=1))  # [T-1]
    return {
        "seam_mean_abs": float(diff[seams].mean()),
        "seam_max_abs": float(diff[seams].max()),
        "all_mean_abs": float(diff.mean()),
        "all_max_abs": float(diff.max()),
        "all_max_frame": int(diff.reshape(len(diff), -1).max(axis=1).argmax()),
        "seam_dtssd": float(dtssd[[t - 1 for t in seams]].mean()),
        "all_dtssd": float(dtssd.mean()),
    }


def run_handoff(model: Any, frames: np.ndarray) -> tuple[np.ndarray, int]:
    state, out = None, []
    for s in range(0, len(frames), SHARD):
        o, state = model.render(frames[s : s + SHARD], None, state)
        out.append(o["alpha"])
    return np.concatenate(out), len(frames)


def run_preroll(model: Any, frames: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    out, rendered = [], 0
    for s in range(0, len(frames), SHARD):
        pre = max(0, s - k)  # the first shard has nothing before it
        o, _ = model.render(frames[pre : s + SHARD], None, None)
        out.append(o["alpha"][s - pre :])
        rendered += min(s + SHARD, len(frames)) - pre
    return np.concatenate(out), rendered


def measure(weights: str, frames: np.ndarray) -> dict[str, Any]:
    from actors.rvm import RVM

    model = RVM()
    model.load(weights)
    seams = seam_frames(len(frames))
    t0 = time.perf_counter()
    single, _ = model.render(frames, None, None)
    ref = single["alpha"]
    res: dict[str, Any] = {"weights": weights, "single_pass_seconds": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    alpha, n = run_handoff(model, frames)
    res["handoff"] = {"frames_rendered": n, "seconds": round(time.perf_counter() - t0, 2),
                      **errors(alpha, ref, seams)}
    res["preroll"] = {}
    for k in PREROLLS:
        t0 = time.perf_counter()
        alpha, n = run_preroll(model, frames, k)
        res["preroll"][str(k)] = {"frames_rendered": n, "seconds": round(time.perf_counter() - t0, 2),
                                  **errors(alpha, ref, seams)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="first 60 frames only (a smoke run, not for the README)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CI box has 2 shared cores)")
    p.add_argument("--video", default=str(Path(SHARED_VIDEOS) / "carphone.mp4"))
    args = p.parse_args()

    import torch

    from farm.video import probe, read_frames
    from farm.weights import resolve

    m = machine()  # before set_num_threads: it records torch's default thread count
    torch.set_num_threads(args.threads)
    m["torch_threads_used"] = args.threads
    info = probe(args.video)
    total = 60 if args.quick else info.frame_count
    frames = np.stack(list(read_frames(args.video, 0, total)))  # [T, H, W, 3] uint8
    runs = {"seeded_random": str(SEEDED), "trained": str(resolve("rvm-mobilenetv3"))}
    results = {}
    for name, w in runs.items():
        print(f"{name}: {w}", flush=True)
        results[name] = measure(w, frames)
        for mode, r in [("handoff", results[name]["handoff"]),
                        *((f"preroll {k}", v) for k, v in results[name]["preroll"].items())]:
            print(f"  {mode:11s} seam mean {r['seam_mean_abs']:.5f} max {r['seam_max_abs']:.4f} "
                  f"dtSSD {r['seam_dtssd']:.5f} | all mean {r['all_mean_abs']:.5f} max {r['all_max_abs']:.4f} "
                  f"| {r['frames_rendered']} frames {r['seconds']}s", flush=True)
    write_result("seams", {
        "machine": m,
        "video": {"url": args.video, "frames": total, "width": info.width, "height": info.height,
                  "fps": f"{info.fps_num}/{info.fps_den}"},
        "model": "rvm mobilenetv3, deep_guided_filter, downsample_ratio auto, float32, cpu",
        "shard_frames": SHARD,
        "seam_frames_per_shard": SEAM,
        "seam_frames": seam_frames(total),
        "units": "alpha in [0, 1]; dtSSD per frame as in the RVM paper (before its x1e2 scaling)",
        "results": results,
    }, quick=args.quick)


if __name__ == "__main__":
    main()
