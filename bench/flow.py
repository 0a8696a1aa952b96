"""Optical flow estimators (``actors/flow.py``): endpoint error on moving textures with known flow, and speed.

Each case is a smooth random texture ``b`` and ``a = b`` sampled at ``x + d(x)`` for a known field ``d``
(translations whole and sub-pixel, a rotation, a zoom, a smooth random field), so ``estimate_flow(a, b)``
should return ``d``. Endpoint error (EPE) = mean ``|estimate - d|`` in pixels over the frame less an 8 %
border (content that enters the frame has no answer). Speed = median wall time per frame pair. Sizes: the
flow resolution VOID uses at its default working size (384x672 -> latents 48x84 -> flow at 4x: 192x336)
and a 480x848 frame.

Estimators: ``dis`` (farm's default, OpenCV DIS preset MEDIUM), DIS's faster presets for context, and
``raft`` (torchvision RAFT-large) when torchvision imports and ``FARM_RAFT_WEIGHTS`` names its weights;
otherwise the JSON says why it was not measured.

    python -m bench.flow [--quick]
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
import time
from typing import Any

import torch

from bench.common import machine, parse_args, write_result

SIZES = ((192, 336), (480, 848))


def texture(h: int, w: int, seed: int) -> torch.Tensor:
    from actors.flow import blur

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g)
    x = 0.6 * blur(x, 1.5) + 0.4 * blur(x, 4.0)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return x


def fields(h: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    """Known flows ``[1, 2, h, w]`` in pixels, scaled to the frame (motion grows with the size)."""
    s = w / 336
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ang = math.radians(3.0)
    rot = torch.stack([(math.cos(ang) - 1) * (xs - cx) - math.sin(ang) * (ys - cy),
                       math.sin(ang) * (xs - cx) + (math.cos(ang) - 1) * (ys - cy)])
    zoom = 0.04 * torch.stack([xs - cx, ys - cy])
    g = torch.Generator().manual_seed(seed)
    rnd = torch.nn.functional.interpolate(torch.randn(1, 2, 4, 6, generator=g), size=(h, w), mode="bicubic",
                                          align_corners=True)[0] * 3.0 * s
    return {
        "shift 2 px": torch.tensor([2.0 * s, -1.0 * s]).view(2, 1, 1).expand(2, h, w),
        "shift 0.5 px": torch.tensor([0.5, 0.25]).view(2, 1, 1).expand(2, h, w),
        "shift 8 px": torch.tensor([-8.0 * s, 5.0 * s]).view(2, 1, 1).expand(2, h, w),
        "rotation 3 deg": rot,
        "zoom 4 %": zoom,
        "smooth random": rnd,
    }


def case_pair(h: int, w: int, flow: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with ``a(x) = b(x + d(x))`` exactly (b sampled bilinearly on a larger texture)."""
    from actors.flow import warp

    m = 48
    big = texture(h + 2 * m, w + 2 * m, seed)
    b = big[..., m : m + h, m : m + w]
    d = torch.zeros(1, 2, h + 2 * m, w + 2 * m)
    d[:, :, m : m + h, m : m + w] = flow
    a = warp(big, d)[..., m : m + h, m : m + w]
    return a, b


def estimators() -> tuple[dict[str, Any], dict[str, str]]:
    import cv2

    from actors.flow import _dis, estimate_flow

    found: dict[str, Any] = {"dis (medium, farm)": lambda a, b: estimate_flow(a, b, method="dis")}
    found["dis fast"] = lambda a, b: _dis(a, b, cv2.DISOPTICAL_FLOW_PRESET_FAST)
    found["dis ultrafast"] = lambda a, b: _dis(a, b, cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    missing: dict[str, str] = {}
    weights = os.environ.get("FARM_RAFT_WEIGHTS")
    if importlib.util.find_spec("torchvision") is None:
        missing["raft"] = "torchvision is not installed (PyPI's torchvision does not import beside torch 2.13 here)"
    elif not weights:
        missing["raft"] = "FARM_RAFT_WEIGHTS is unset (raft_large weights cannot be downloaded here)"
    else:
        found["raft large"] = lambda a, b: estimate_flow(a, b, method="raft", weights=weights)
    return found, missing


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    m = machine()
    found, missing = estimators()
    sizes = SIZES[:1] if args.quick else SIZES
    repeats = 2 if args.quick else 5
    results: dict[str, Any] = {}
    for h, w in sizes:
        size_key = f"{h}x{w}"
        results[size_key] = {}
        for name, fn in found.items():
            per_case, times = {}, []
            for i, (case, d) in enumerate(fields(h, w, seed=7).items()):
                a, b = case_pair(h, w, d, seed=11 + i)
                est = fn(a, b)[0]
                by, bx = int(0.08 * h), int(0.08 * w)
                err = (est - d)[:, by : h - by, bx : w - bx]
                per_case[case] = round(float(err.norm(dim=0).mean()), 4)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn(a, b)
                    times.append(time.perf_counter() - t0)
            results[size_key][name] = {
                "epe_px": per_case,
                "epe_mean_px": round(statistics.mean(per_case.values()), 4),
                "ms_per_pair": round(1000 * statistics.median(times), 2),
            }
            r = results[size_key][name]
            print(f"{size_key} {name:20s} EPE {r['epe_mean_px']:.3f} px  {r['ms_per_pair']:.1f} ms/pair  {per_case}",
                  flush=True)
    write_result(
        "flow",
        {
            "machine": m,
            "units": "EPE: mean endpoint error in px over the frame less an 8% border; ms per frame pair (median)",
            "torch_threads": torch.get_num_threads(),
            "results": results,
            "not_measured": missing,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
