"""VOID measurements: what VAE tiling changes, and pass 2's seam with and without the noise handoff.

Tiling. Upstream never tiles the CogVideoX VAE; farm tiles only when ``vae_tiling`` is set (or ``memory:
sequential``). A real clip (``videos/cockatoo.mp4``, area-resized to 384x672, 21 frames, as pass 1 sees
it) is encoded with the reference's seeded random-weight VAE (``reference/void/model/vae``) both ways,
and the untiled latents decoded both ways: max and mean |difference| of the scaled latents (their std
for scale) and of the decoded frames on [0, 1] (clamped, as pass 1 outputs them).

Seam. The reference model and clip B (25 frames, 48x80, ``window_frames`` 21) in two pass-2 shards
[0, 17) and [9, 25) that share 8 frames, after one pass 1 over the clip: with the warper's state handed
from shard 0 to shard 1, and without (shard 1 starts fresh noise). Figures: mean |difference| of the two
shards' noise (per frame, latent grid) and of their outputs over the shared frames; the step between
consecutive frames of the stitched result at the seam against inside a shard.

    python -m bench.void [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from bench.common import SHARED_VIDEOS, machine, parse_args, write_result

REF = SHARED_VIDEOS.parent / "reference" / "void"


def tiling(quick: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKLCogVideoX

    from farm.video import read_frames

    h, w = (240, 420) if quick else (384, 672)
    frames = np.stack(list(read_frames(str(SHARED_VIDEOS / "cockatoo.mp4"), 0, 21)))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="area") * 2 - 1
    z_in = x.permute(1, 0, 2, 3)[None]
    vae = AutoencoderKLCogVideoX.from_pretrained(REF / "model" / "vae").eval()
    sf = vae.config.scaling_factor
    with torch.inference_mode():
        vae.disable_tiling()
        plain = vae.encode(z_in).latent_dist.mode() * sf
        dec_plain = vae.decode(plain / sf).sample
        vae.enable_tiling()
        tiled = vae.encode(z_in).latent_dist.mode() * sf
        dec_tiled = vae.decode(plain / sf).sample
    lat = (tiled - plain).abs()
    pix = ((dec_tiled / 2 + 0.5).clamp(0, 1) - (dec_plain / 2 + 0.5).clamp(0, 1)).abs()  # as pass 1 outputs them
    return {
        "size": f"{h}x{w}",
        "frames": 21,
        "tile_sample_min_hw": [vae.tile_sample_min_height, vae.tile_sample_min_width],
        "latent_std": round(float(plain.std()), 4),
        "latent_max_abs_diff": round(float(lat.max()), 4),
        "latent_mean_abs_diff": round(float(lat.mean()), 4),
        "decoded_max_abs_diff": round(float(pix.max()), 4),
        "decoded_mean_abs_diff": round(float(pix.mean()), 4),
    }


def seam(quick: bool) -> dict[str, Any]:
    from actors.base import VideoContext
    from actors.void import VOID
    from farm.stitch import blend

    with np.load(REF / "inputs.npz") as z:
        frames = z["frames_b"]
    t = len(frames)
    steps = 4 if quick else 20
    m = VOID(window_frames=21, window_overlap=16, max_area=48 * 80, steps=steps, refine_steps=steps,
             noise_scale=16, flow_scale=4)
    m.load(str(REF / "model"))
    ctx = VideoContext(url=str(REF / "clip_b.mp4"), frame_count=t, width=80, height=48, fps=12.0,
                       params={"mask": str(REF / "clip_b_quadmask.mp4"),
                               "prompt": "a sandy beach with small grey pebbles"})
    cond = m.prepare(ctx)
    p1 = m.render(frames, cond, None, span=(0, t))[0]["rgb"]
    a, b, shared = (0, 17), (9, 25), 8
    t0 = time.perf_counter()
    out0, st = m.refine(frames[a[0] : a[1]], {"rgb": p1[a[0] : a[1]]}, cond, None, a, 0, shared)
    hand, _ = m.refine(frames[b[0] : b[1]], {"rgb": p1[b[0] : b[1]]}, cond, st, b, shared, 0)
    cold, _ = m.refine(frames[b[0] : b[1]], {"rgb": p1[b[0] : b[1]]}, cond, None, b, 0, 0)
    seconds = time.perf_counter() - t0
    n0, state = m.warped_noise(p1[a[0] : a[1]], a[0], None, a[1] - a[0] - shared)
    n_hand, _ = m.warped_noise(p1[b[0] : b[1]], b[0], state)
    n_cold, _ = m.warped_noise(p1[b[0] : b[1]], b[0])

    def stitched(second: np.ndarray) -> np.ndarray:
        return np.concatenate([out0["rgb"][:-shared], blend(out0["rgb"][-shared:], second[:shared]),
                               second[shared:]])

    def steps_of(video: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))

    result: dict[str, Any] = {"shards": [a, b], "shared_frames": shared, "steps": steps, "seconds": round(seconds, 1)}
    for name, second, noise in (("handoff", hand["rgb"], n_hand), ("no_handoff", cold["rgb"], n_cold)):
        s = steps_of(stitched(second))
        result[name] = {
            "noise_mean_abs_diff_shared": round(float((n0[a[1] - shared : a[1]] - noise[:shared]).abs().mean()), 5),
            "output_mean_abs_diff_shared": round(float(np.abs(out0["rgb"][-shared:] - second[:shared]).mean()), 5),
            "step_at_seam_max": round(float(s[a[1] - shared - 1 : a[1]].max()), 5),
            "step_inside_max": round(float(np.r_[s[: a[1] - shared - 2], s[a[1] + 1 :]].max()), 5),
        }
    return result


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(2)
    m = machine()
    tile = tiling(args.quick)
    print("tiling", tile, flush=True)
    sm = seam(args.quick)
    print("seam", sm, flush=True)
    write_result("void", {"machine": m, "model": "reference/void/model (seeded random weights), float32, cpu",
                          "tiling": tile, "seam": sm}, quick=args.quick)


if __name__ == "__main__":
    main()
