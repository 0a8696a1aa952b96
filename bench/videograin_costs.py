"""What farm's VideoGrain additions cost against upstream's single clip, measured side by side.

On the shared reference (tiny seeded SD1.5-shaped model + ControlNet, 6 frames at 128x192, the plain
configuration: FLATTEN and PnP off, float32, one torch thread): upstream's case is one clip, no anchors.
Against it: the anchors (``prepare`` edits 2 anchor frames; every clip carries them), clips shorter than
the video (2 windows of 4 frames, overlap 2, blended by farm's stitcher, with and without anchors), and the
inversion cache (a hit against a miss). Each: CPU seconds, and how far its frames land from the single clip's
(mean / max |rgb difference| on [0, 1]). ``python -m bench.videograin_costs [--quick]``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, machine_line, parse_args, write_result

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "videograin"


def main() -> None:
    args = parse_args(__doc__)
    import torch
    from PIL import Image

    from actors.base import VideoContext
    from actors.videograin import VideoGrain
    from farm.stitch import blend

    torch.set_num_threads(1)
    inp = np.load(REF / "inputs.npz")
    par = json.loads((REF / "params.json").read_text())
    steps = 6 if args.quick else 20
    tmp = Path(tempfile.mkdtemp(prefix="vgbench-"))
    masks = []
    for r, m in enumerate(inp["masks"]):
        (tmp / f"m{r}").mkdir()
        for t, f in enumerate(m):
            Image.fromarray(f.astype(np.uint8) * 255).save(tmp / f"m{r}" / f"{t:05d}.png")
        masks.append(str(tmp / f"m{r}"))
    frames = inp["frames"]
    import av

    with av.open(str(tmp / "clip.mov"), "w") as c:  # lossless: prepare reads the anchors' frames from it
        st = c.add_stream("png", rate=10)
        st.width, st.height, st.pix_fmt = 192, 128, "rgb24"
        for f in frames:
            c.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(st.encode())

    def actor(**extra: Any) -> VideoGrain:
        m = VideoGrain(prompt=par["prompt"], local_prompts=par["local_prompts"], masks=masks,
                       source_prompt=par["source_prompt"], negative_prompt=par["negative_prompt"], steps=steps,
                       control_scale=par["controlnet_conditioning_scale"], resolution=128, flatten_res=[],
                       seed=par["vae_seed"], **extra)
        m.load(str(REF / "tiny-sd15"))
        return m

    def timed(fn: Any) -> tuple[Any, float]:
        """CPU seconds of this process (one torch thread): robust on a shared machine, unlike wall time."""
        t0 = time.process_time()
        out = fn()
        return out, time.process_time() - t0

    def video(frame_count: int) -> VideoContext:
        return VideoContext(url=str(tmp / "clip.mov"), frame_count=frame_count, width=192, height=128, fps=10,
                            params={})

    def render(m: VideoGrain, cond: dict, span: tuple[int, int]) -> np.ndarray:
        return m.render(frames[span[0] : span[1]], cond, None, span=span)[0]["rgb"]

    def windows(m: VideoGrain, cond: dict) -> tuple[np.ndarray, float, float]:
        """The stitched video, seconds, and how far the two clips disagree on their 2 shared frames."""
        (a, ta), (b, tb) = timed(lambda: render(m, cond, (0, 4))), timed(lambda: render(m, cond, (2, 6)))
        seam = float(np.abs(a[2:] - b[:2]).mean())
        return np.concatenate([a[:2], blend(a[2:], b[:2]), b[2:]]), ta + tb, seam

    def far(x: np.ndarray, base: np.ndarray) -> dict[str, float]:
        d = np.abs(x - base)
        return {"mean_abs": float(d.mean()), "max_abs": float(d.max())}

    results: dict[str, Any] = {}
    plain = actor(anchors=0)
    cond0 = plain.prepare(video(6))
    base, t_base = timed(lambda: render(plain, cond0, (0, 6)))
    results["single_clip"] = {"s": t_base, "what": "upstream's case: one clip, no anchors"}

    anchored = actor(anchors=2)
    cond_a, t_prep = timed(lambda: anchored.prepare(video(6)))  # anchors at frames 0 and 5
    cond_a = {**cond_a, "frame_count": 60}  # as one clip of a longer video: the clip carries the anchors
    rgb_a, t_a = timed(lambda: render(anchored, cond_a, (0, 6)))
    results["anchors"] = {"prepare_s": t_prep, "clip_s": t_a, "clip_ratio": t_a / t_base, **far(rgb_a, base),
                          "what": "2 anchors: prepare edits them once per video; each clip carries them"}
    rgb_w, t_w, seam_w = windows(anchored, cond_a)
    results["windows_anchored"] = {"s": t_w, "ratio": t_w / t_base, **far(rgb_w, base), "overlap_mean_abs": seam_w,
                                   "what": "2 clips of 4 frames (overlap 2) with the anchors, stitched"}
    rgb_n, t_n, seam_n = windows(plain, {**cond0, "frame_count": 60})
    results["windows_no_anchors"] = {"s": t_n, "ratio": t_n / t_base, **far(rgb_n, base), "overlap_mean_abs": seam_n,
                                     "what": "the same 2 clips without anchors"}

    cached = actor(anchors=0, cache=str(tmp / "cache"))
    miss, t_miss = timed(lambda: render(cached, cond0, (0, 6)))
    hit, t_hit = timed(lambda: render(cached, cond0, (0, 6)))
    blob = sum(p.stat().st_size for p in (tmp / "cache").glob("*.npz"))
    results["inversion_cache"] = {"miss_s": t_miss, "hit_s": t_hit, "hit_ratio": t_hit / t_miss,
                                  "entry_bytes": blob, **far(hit, miss)}
    print(json.dumps(results, indent=1))
    m = machine()
    write_result("videograin_costs", {"machine": m, "machine_line": machine_line(m), "steps": steps,
                                      "results": results}, args.quick)


if __name__ == "__main__":
    main()
