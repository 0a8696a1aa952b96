"""Go-with-the-Flow noise warping (Burgert et al., 2025) in torch: Gaussian noise that follows optical flow.

VOID's pass 2 starts its denoising from this noise (upstream: ``make_warped_noise.py`` driving
Go-with-the-Flow's ``NoiseWarper``). Each pixel of a high-resolution noise plane is a particle with a
weight. One step along a forward flow ``d`` (content at ``x`` in the previous frame is at ``x + d`` now):

1. *shrink*: every particle is scattered to ``x + round(d)``; particles that land on one pixel merge,
   weighted, so that the merged value stays unit-variance (``Σ w n / sqrt(Σ w²)``);
2. *expand*: pixels nothing lands on pull the particle at ``x - d`` (nearest); where that is outside the
   plane they start afresh (weight 1, value 0);
3. *regaussianise*: both planes side by side, pixels holding the same value (copies of one particle, or
   the fresh zeros) form a group; each pixel keeps ``value / sqrt(count)`` plus fresh noise with the
   group's mean removed — the copies of one particle become independent while their sum is kept;
4. weights are divided among copies, normalised to mean 1, then pulled toward 1 (``** 0.9999``).

The plane is then area-downscaled to the latent grid and multiplied by the factor (unit variance again).
The RNG is drawn exactly as upstream (one ``randn(c, h, w)`` at construction, one ``randn(c, h, 2w)``
per step), so seeded alike this reproduces upstream's noise to float rounding; a ``generator`` may be
given per step instead of torch's global one (farm seeds each video frame, so that a shard can redo the
steps of the frames it shares with the previous shard and get the same noise).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

UPSTREAM_NOISE_FRAMES = 72  # make_warped_noise.py resamples the pass-1 video to 72 frames


def regaussianize(noise: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[c, h, w]`` -> (noise whose groups of equal pixels are made independent, ``[1, h, w]`` group sizes).

    Pixels are grouped by their value in channel 0."""
    c, h, w = noise.shape
    _, inverse, counts = torch.unique(noise[0].reshape(-1), return_inverse=True, return_counts=True)
    foreign = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
    flat = foreign.permute(1, 2, 0).reshape(-1, c)  # [(h w), c]
    sums = torch.zeros(len(counts), c, dtype=noise.dtype, device=noise.device).index_add_(0, inverse, flat)
    means = sums / counts[:, None]
    zeroed = foreign - means[inverse].reshape(h, w, c).permute(2, 0, 1)
    counts_image = counts[inverse].reshape(1, h, w)
    return noise / counts_image**0.5 + zeroed, counts_image


def _remap_nearest(image: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``image`` ``[c, h, w]`` read at ``(x + dx, y + dy)`` rounded to the nearest pixel, 0 outside."""
    _, h, w = image.shape
    x = (dx + torch.arange(w, device=dx.device, dtype=dx.dtype)) / (w - 1) * 2 - 1
    y = (dy + torch.arange(h, device=dy.device, dtype=dy.dtype)[:, None]) / (h - 1) * 2 - 1
    grid = torch.stack([x, y], dim=-1)[None].to(image.dtype)
    return F.grid_sample(image[None], grid, mode="nearest", align_corners=True)[0]


def _scatter_add(image: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """``image`` ``[c, h, w]`` added into pixel ``(x + sx, y + sy)`` (integer offsets); outside is dropped."""
    c, h, w = image.shape
    x = sx.long() + torch.arange(w, device=sx.device)
    y = sy.long() + torch.arange(h, device=sy.device)[:, None]
    valid = ((y >= 0) & (y < h) & (x >= 0) & (x < w)).reshape(-1)
    index = (y * w + x).reshape(-1)[valid]
    out = torch.zeros(h * w, c, dtype=image.dtype, device=image.device)
    out.index_add_(0, index, image.permute(1, 2, 0).reshape(-1, c)[valid])
    return out.reshape(h, w, c).permute(2, 0, 1)


def warp_step(
    weights: torch.Tensor, noise: torch.Tensor, flow: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the particle warp: ``weights`` ``[h, w]``, ``noise`` ``[c, h, w]``, forward ``flow``
    ``[2, h, w]`` at the plane's resolution -> the new (weights, noise)."""
    c, h, w = noise.shape
    dx, dy = flow[0], flow[1]
    # expand: pull from x - d
    pulled = _remap_nearest(torch.cat([weights[None], noise]), -dx, -dy)
    e_w, e_n = pulled[0], pulled[1:]
    e_w = torch.where(e_w == 0, torch.ones_like(e_w), e_w)  # new regions: weight 1, value 0
    # shrink: push to x + round(d); a particle whose target is outside restarts in place (weight 1, value 0)
    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    gx, gy = gx.to(flow.device, flow.dtype), gy.to(flow.device, flow.dtype)
    px, py = (gx + dx).round(), (gy + dy).round()
    out = ~((px >= 0) & (px < w) & (py >= 0) & (py < h))
    s_w = torch.where(out, torch.ones_like(weights), weights)
    s_n = torch.where(out[None], torch.zeros_like(noise), noise)
    sx = torch.where(out, torch.zeros_like(dx), dx).round()
    sy = torch.where(out, torch.zeros_like(dy), dy).round()
    landed = _scatter_add(torch.ones(1, h, w, dtype=flow.dtype, device=flow.device), sx, sy)[0] > 0
    e_w = torch.where(landed, torch.ones_like(e_w), e_w)
    e_n = torch.where(landed[None], torch.zeros_like(e_n), e_n)
    # regaussianise shrink | expand side by side; split the weights among copies
    both, counts = regaussianize(torch.cat([s_n, e_n], dim=2), generator)
    both_w = (torch.cat([s_w, e_w], dim=1) / counts[0]).nan_to_num()
    s_n, e_n = both[:, :, :w], both[:, :, w:]
    s_w, e_w = both_w[:, :w], both_w[:, w:]
    m_w = _scatter_add(s_w[None], sx, sy)[0]
    m_n = _scatter_add(s_n * s_w[None], sx, sy) / _scatter_add(s_w[None] ** 2, sx, sy).sqrt()
    new_w = torch.where(landed, m_w, e_w)
    new_n = torch.where(landed[None], m_n, e_n)
    new_w = new_w / new_w.mean()
    new_w = (new_w + 0.00001) ** 0.9999
    return new_w, new_n


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Forward flow ``[2, h, w]`` resized to the warp plane ``size`` and rescaled, as upstream's warper does:
    bilinear to grow, area to shrink (per axis), then dx times the height ratio and dy times the width ratio
    (upstream's pairing; the ratios are equal when the aspect is kept)."""
    _, h0, w0 = flow.shape
    h, w = size
    out = flow.clone()
    if (h, w) != (h0, w0):
        if h >= h0 and w >= w0:
            out = F.interpolate(out[None], size=(h, w), mode="bilinear")[0]
        elif h <= h0 and w <= w0:
            out = F.interpolate(out[None], size=(h, w), mode="area")[0]
        else:
            if h < h0:
                out = F.interpolate(out[None], size=(h, out.shape[2]), mode="area")[0]
            if w < w0:
                out = F.interpolate(out[None], size=(out.shape[1], w), mode="area")[0]
            if h > h0:
                out = F.interpolate(out[None], size=(h, out.shape[2]), mode="bilinear")[0]
            if w > w0:
                out = F.interpolate(out[None], size=(out.shape[1], w), mode="bilinear")[0]
    out[0] *= h / h0
    out[1] *= w / w0
    return out


class NoiseWarper:
    """A warped-noise plane of ``c`` channels at ``h x w`` (upstream's ``NoiseWarper`` with its defaults).

    ``warper(dx, dy)`` advances one frame; ``warper.noise`` is the weighted noise ``[c, h, w]``. Construct
    with ``noise=`` and ``weights=`` to resume from a saved state (``state()``)."""

    def __init__(
        self,
        c: int,
        h: int,
        w: int,
        device: str | torch.device = "cpu",
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.c, self.h, self.w = c, h, w
        if noise is None:
            noise = torch.randn(c, h, w, generator=generator, device=device)
        self._noise = noise.to(device, torch.float32)
        self._weights = torch.ones(h, w, device=device) if weights is None else weights.to(device, torch.float32)

    @property
    def noise(self) -> torch.Tensor:
        return self._noise * self._weights[None] / (self._weights[None] ** 2).sqrt()

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    def state(self) -> torch.Tensor:
        """``[1 + c, h, w]``: weights then the raw noise (what a later warper resumes from)."""
        return torch.cat([self._weights[None], self._noise])

    @classmethod
    def from_state(cls, state: torch.Tensor) -> NoiseWarper:
        s = torch.as_tensor(state, dtype=torch.float32)
        return cls(s.shape[0] - 1, s.shape[1], s.shape[2], s.device, noise=s[1:], weights=s[0])

    def __call__(self, dx: torch.Tensor, dy: torch.Tensor, generator: torch.Generator | None = None) -> NoiseWarper:
        flow = torch.stack([torch.as_tensor(dx), torch.as_tensor(dy)]).to(self._noise.device, torch.float32)
        flow = resize_flow(flow, (self.h, self.w))
        self._weights, self._noise = warp_step(self._weights, self._noise, flow, generator)
        return self


def downscale(noise: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-downscale ``[..., c, h, w]`` noise by ``factor`` and multiply by it (unit variance again)."""
    if factor == 1:
        return noise.clone()
    lead = noise.shape[:-3]
    x = noise.reshape(-1, *noise.shape[-3:])
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    return (F.interpolate(x, size=(h, w), mode="area") * factor).reshape(*lead, x.shape[1], h, w)


def upstream_frame_picks(frames: int, latents: int, resampled: int = UPSTREAM_NOISE_FRAMES) -> list[int]:
    """The video frame whose noise each latent frame gets upstream: ``make_warped_noise.py`` resamples the
    ``frames`` of the pass-1 video to ``resampled`` (nearest, last kept), then the loader keeps
    ``linspace(0, resampled - 1, latents).astype(int)`` of those."""
    step = (frames - 1) / (resampled - 1) if frames > 1 and resampled > 1 else 0.0
    kept = np.linspace(0, resampled - 1, latents).astype(int)
    return [round(int(j) * step) for j in kept]


def load_warped_noise(noise: np.ndarray, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Upstream's ``load_and_resize_warped_noise``: a ``noises.npy`` array (THWC, or TCHW when its second axis
    is 16) -> ``float32 [1, l, c, h, w]`` for ``shape = (l, h, w, c)``; frames picked by
    ``linspace(0, T - 1, l).astype(int)``, each channel resized with OpenCV's bilinear ``INTER_LINEAR``."""
    import cv2

    arr = np.asarray(noise)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.ndim == 4 and arr.shape[1] == 16:
        arr = arr.transpose(0, 2, 3, 1)
    lat_t, lat_h, lat_w, _ = shape
    if arr.shape != tuple(shape):
        if arr.shape[0] != lat_t:
            arr = arr[np.linspace(0, arr.shape[0] - 1, lat_t).astype(int)]
        size = (lat_w, lat_h)
        arr = np.stack(
            [np.stack([cv2.resize(f[:, :, c], size, interpolation=cv2.INTER_LINEAR) for c in range(f.shape[2])], 2)
             for f in arr]
        )
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).float()[None]
