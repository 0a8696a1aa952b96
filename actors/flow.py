"""Dense optical flow for the models that follow motion (VOID's warped noise, VideoGrain's FLATTEN).

Two estimators behind one call, ``estimate_flow(a, b, method=..., weights=...)``:

- ``"dis"`` (default, offline): OpenCV's Dense Inverse Search (Kroeger et al., 2016), preset MEDIUM, on
  8-bit luma. Needs no weights; runs on the CPU.
- ``"raft"``: torchvision's RAFT-large architecture (what Go-with-the-Flow, and so VOID upstream, uses),
  with its weights from ``weights`` (a path or URL that ``farm.weights`` resolves: a state dict for
  ``torchvision.models.optical_flow.raft_large``). Frames are resized to multiples of 8, mapped to
  [-1, 1], given 12 refinement iterations, and the flow is resized back, as upstream's wrapper does.
  torchvision is imported only here.

Convention: ``flow = estimate_flow(a, b)`` is the displacement ``d`` with ``a(x) ≈ b(x + d)``, in pixels,
``[N, 2, H, W]`` (x then y): the forward flow from ``a`` to ``b``. ``warp(b, flow)`` samples ``b`` at
``x + flow`` (backward warping), so ``warp(b, estimate_flow(a, b)) ≈ a``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("dis", "raft")
_RAFT: dict[tuple[str, str], Any] = {}  # (weights path, device) -> loaded model


class FlowError(ValueError):
    """A flow method or its weights cannot be used (one line, names what is wrong)."""


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


def estimate_flow(
    a: torch.Tensor, b: torch.Tensor, *, method: str = "dis", weights: str | None = None
) -> torch.Tensor:
    """Forward flow ``d`` with ``a(x) ≈ b(x + d)`` for image batches ``[N, C, H, W]`` in [0, 1] (C = 1 or 3),
    ``float32 [N, 2, H, W]`` on ``a``'s device. ``method``: ``"dis"`` or ``"raft"`` (needs ``weights``)."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(
            f"estimate_flow: images must both be [N, C, H, W], C 1 or 3 (got {tuple(a.shape)}, {tuple(b.shape)})"
        )
    if method == "dis":
        return _dis(a, b)
    if method == "raft":
        return _raft(a, b, weights)
    raise FlowError(f"flow method must be one of {', '.join(METHODS)} (got {method!r})")


# ---------------------------------------------------------------------------------------------- DIS


def _luma8(x: torch.Tensor) -> np.ndarray:
    x = x.detach().float().cpu()
    if x.shape[1] == 3:
        x = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    else:
        x = x[:, 0]
    return (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()


def _dis(a: torch.Tensor, b: torch.Tensor, preset: int | None = None) -> torch.Tensor:
    import cv2

    preset = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM if preset is None else preset
    ga, gb = _luma8(a), _luma8(b)
    # a fresh DIS per pair: one object carries state from call to call, so a pair's flow would depend on the
    # pairs computed before it (and a shard's flow on where the shard starts)
    out = np.stack([cv2.DISOpticalFlow_create(preset).calc(x, y, None) for x, y in zip(ga, gb, strict=True)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(a.device)


# ---------------------------------------------------------------------------------------------- RAFT


def _raft_model(weights: str | None, device: torch.device) -> Any:
    if not weights:
        raise FlowError("flow method 'raft' needs weights (params.flow_weights: a raft_large state dict path or URL)")
    try:
        from torchvision.models.optical_flow import raft_large
    except ImportError as e:
        raise FlowError(f"flow method 'raft' needs torchvision (pip install torchvision matching torch): {e}") from e
    from farm.weights import WeightsError, load_state_dict, resolve

    try:
        path = resolve(str(weights))
    except WeightsError as e:
        raise FlowError(f"flow_weights: {e}") from e
    key = (str(path), str(device))
    if key not in _RAFT:
        model = raft_large(weights=None, progress=False)
        try:
            sd = load_state_dict(path)
            model.load_state_dict(sd, strict=True)
        except (WeightsError, RuntimeError) as e:
            raise FlowError(f"flow_weights {weights!r} is not a raft_large state dict: {str(e).splitlines()[0]}") from e
        _RAFT[key] = model.eval().to(device)
    return _RAFT[key]


def _raft(a: torch.Tensor, b: torch.Tensor, weights: str | None) -> torch.Tensor:
    model = _raft_model(weights, a.device)
    h, w = a.shape[-2:]
    h8, w8 = max(8, h // 8 * 8), max(8, w // 8 * 8)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if (h8, w8) != (h, w):
            mode = "area" if h8 <= h and w8 <= w else "bilinear"
            x = F.interpolate(x, size=(h8, w8), mode=mode)
        return x * 2 - 1

    with torch.inference_mode():
        flow = model(prep(a), prep(b), num_flow_updates=12)[-1]
    if (h8, w8) != (h, w):  # resized back, values unscaled, as upstream's wrapper
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    return flow.float()
