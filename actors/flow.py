"""Dense optical flow in plain torch: coarse-to-fine Lucas–Kanade with Gaussian windows.

VOID's pass 2 warps noise along the flow of the pass-1 output. Upstream calls RAFT (weights fetched at
run time); a farm model may fetch nothing at render time, so this is a small classical estimator in the
spirit of Farnebäck's pyramid: at each level from coarse to fine, warp the second image by the current
flow and solve the windowed 2x2 brightness-constancy system for an update, a few times.

Convention: ``flow = estimate_flow(a, b)`` is the displacement ``d`` with ``a(x) ≈ b(x + d)``, in pixels,
``[N, 2, H, W]`` (x then y). ``warp(b, flow)`` samples ``b`` at ``x + flow`` (backward warping), so
``warp(b, estimate_flow(a, b)) ≈ a``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, device=device, dtype=dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with replicated borders."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma, x.device, x.dtype)
    r = k.numel() // 2
    c = x.shape[1]
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _grid(flow: torch.Tensor) -> torch.Tensor:
    """Sampling grid (normalised, align_corners=True) for ``x + flow``."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device, dtype=flow.dtype),
        torch.arange(w, device=flow.device, dtype=flow.dtype),
        indexing="ij",
    )
    gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    return torch.stack([gx, gy], dim=-1)


def warp(img: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``img`` ``[N, C, H, W]`` sampled at ``x + flow`` (border pixels repeat outside the frame)."""
    return F.grid_sample(img, _grid(flow), mode=mode, padding_mode="border", align_corners=True)


def inside(flow: torch.Tensor) -> torch.Tensor:
    """``bool [N, H, W]``: where ``x + flow`` lands inside the frame (else the content is new)."""
    _, _, h, w = flow.shape
    g = _grid(flow)
    return (g[..., 0].abs() <= 1.0) & (g[..., 1].abs() <= 1.0) if h > 1 and w > 1 else torch.ones_like(g[..., 0]).bool()


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.mean(dim=1, keepdim=True)


def estimate_flow(
    a: torch.Tensor,
    b: torch.Tensor,
    levels: int | None = None,
    iterations: int = 4,
    window_sigma: float = 2.0,
    reg: float = 1e-4,
    min_size: int = 8,
) -> torch.Tensor:
    """Flow ``d`` with ``a(x) ≈ b(x + d)`` for image batches ``[N, C, H, W]`` in [0, 1] (C = 1 or 3).

    ``levels`` (pyramid depth, None = down to ``min_size`` px), ``iterations`` (warp-and-solve rounds per
    level), ``window_sigma`` (Gaussian window of the local least squares, in pixels of each level),
    ``reg`` (Tikhonov term: flat regions get no update instead of a wild one).
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"estimate_flow: images must both be [N, C, H, W] (got {tuple(a.shape)}, {tuple(b.shape)})")
    a, b = _gray(a.float()), _gray(b.float())
    h, w = a.shape[-2:]
    if levels is None:
        levels = max(1, int(math.floor(math.log2(max(min(h, w) / min_size, 1.0)))) + 1)
    pa, pb = [blur(a, 0.8)], [blur(b, 0.8)]
    for _ in range(levels - 1):
        pa.append(F.avg_pool2d(blur(pa[-1], 1.0), 2, ceil_mode=True))
        pb.append(F.avg_pool2d(blur(pb[-1], 1.0), 2, ceil_mode=True))
    flow = torch.zeros(a.shape[0], 2, *pa[-1].shape[-2:], device=a.device, dtype=a.dtype)
    for lvl in range(levels - 1, -1, -1):
        la, lb = pa[lvl], pb[lvl]
        if flow.shape[-2:] != la.shape[-2:]:
            sy, sx = la.shape[-2] / flow.shape[-2], la.shape[-1] / flow.shape[-1]
            flow = F.interpolate(flow, size=la.shape[-2:], mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([sx, sy], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
        for _ in range(iterations):
            bw = warp(lb, flow)
            mid = 0.5 * (la + bw)
            ix = 0.5 * (
                F.pad(mid, (0, 1, 0, 0), mode="replicate")[..., 1:]
                - F.pad(mid, (1, 0, 0, 0), mode="replicate")[..., :-1]
            )
            iy = 0.5 * (
                F.pad(mid, (0, 0, 0, 1), mode="replicate")[..., 1:, :]
                - F.pad(mid, (0, 0, 1, 0), mode="replicate")[..., :-1, :]
            )
            it = bw - la
            sxx, syy, sxy = blur(ix * ix, window_sigma), blur(iy * iy, window_sigma), blur(ix * iy, window_sigma)
            sxt, syt = blur(ix * it, window_sigma), blur(iy * it, window_sigma)
            sxx, syy = sxx + reg, syy + reg
            det = sxx * syy - sxy * sxy
            du = -(syy * sxt - sxy * syt) / det
            dv = -(sxx * syt - sxy * sxt) / det
            step = torch.cat([du, dv], dim=1).clamp(-2.0, 2.0)  # at most 2 px per round at each level
            flow = blur(flow + step, 0.7)
    return flow
