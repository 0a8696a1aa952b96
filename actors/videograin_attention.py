"""ST-Layout attention (VideoGrain, Yang et al. ICLR 2025) as diffusers attention processors.

The UNet is upstream's inflated 3D UNet run as diffusers' 2D one: the frames of a clip are its batch,
``[halves * (T + A), N, C]`` with ``halves`` = 2 under classifier-free guidance (``[uncond | cond]``),
``T`` clip frames and ``A`` anchor frames after them (farm's addition; ``A = 0`` is upstream).

- Self-attention is full-frame: every query of a clip frame attends to the keys/values of all the clip's
  frames (and of the anchors); anchor queries attend to the anchors only, so the anchors' keys/values are
  the same in every clip. The ControlNet keeps diffusers' per-frame attention (upstream's does too).
- Modulation (editing steps ``< modulated_steps``, levels below the latent size, ``treg = ((t-1)/1000)^5``):
  self-attention in the *unconditional* half: where query and key share a region the score is pulled
  toward the row's maximum, elsewhere pushed toward its minimum, by ``sreg * treg * size(q)``,
  ``size(q) = 1 - count(q) / (F^2 h w)`` in float16 (upstream's dtype). Cross-attention in the
  *conditional* half: between a pixel of region ``r`` and the tokens of local prompt ``r``, by
  ``creg * treg * (1 - area of that pixel's region in its frame)``. A pixel in no mask is in no region.
- FLATTEN (levels in ``flatten``): after the full-frame attention has made ``O``, each query attends over
  the ``T`` positions of its optical-flow trajectory, keys ``to_k(x)``, values ``O`` (see
  ``actors/videograin_flatten.py``).
- PnP: the ``attn1`` of upstream's six decoder layers records its ``to_q`` / ``to_k`` outputs during the
  recording pass, and has them replaced during the first ``inject_step`` editing steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from actors.videograin_flatten import flatten_attention

Bias = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class STContext:
    """What the processors and the inflated norms need to know about the current UNet call (set per call)."""

    frames: int = 1  # T
    anchors: int = 0  # A
    halves: int = 1
    latent_hw: tuple[int, int] = (0, 0)
    layouts: torch.Tensor | None = None  # [R, T + A, h, w] {0, 1} at latent size (nearest), one per region
    token_regions: torch.Tensor | None = None  # [R, L] {0, 1}: token j is a word of local prompt r
    modulate: bool = False
    treg: torch.Tensor | None = None  # float32 scalar ((t - 1) / 1000) ** 5
    sreg: float = 0.3
    creg: float = 1.0
    modulate_full_res: bool = False
    flatten: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # n -> (index [T n, T], mask [T n, T])
    old_qk: int = 1
    pnp: str | None = None  # "record" | "inject" | None
    pnp_store: dict[str, torch.Tensor] = field(default_factory=dict)
    chunk: int = 1 << 26  # score elements per explicit attention chunk (memory bound)
    fingerprint_rows: str | None = None  # "anchors" or "clip": record the first self-attention keys of those rows
    fingerprint: list[float] | None = None
    _levels: dict[int, torch.Tensor] = field(default_factory=dict)

    def reset(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self, k, v)
        self._levels = {}

    @property
    def segments(self) -> list[int]:
        """Frames per GroupNorm fold along the batch: each half's clip, then its anchors."""
        return ([self.frames] + ([self.anchors] if self.anchors else [])) * self.halves

    def level(self, n: int) -> int:
        """``k`` with ``(h >> k) * (w >> k) == n``: the UNet level of a layer with ``n`` tokens per frame."""
        h, w = self.latent_hw
        for k in range(16):
            if (h >> k) * (w >> k) == n:
                return k
        raise RuntimeError(f"videograin: no latent level of {h}x{w} has {n} tokens")

    def layout(self, n: int) -> torch.Tensor:
        """``[R, T + A, n]``: the layouts at the level with ``n`` tokens, cell ``(2^k i, 2^k j)`` (nearest)."""
        if n not in self._levels:
            assert self.layouts is not None
            s = 1 << self.level(n)
            lay = self.layouts[:, :, ::s, ::s]
            self._levels[n] = lay.reshape(lay.shape[0], lay.shape[1], -1).float()
        return self._levels[n]


def self_maps(rows: torch.Tensor, cols: torch.Tensor, frames: int, n: int) -> tuple[Callable, torch.Tensor]:
    """Queries ``rows [R, nq]`` against keys ``cols [R, nk]`` of ``frames`` frames of ``n`` tokens:
    ``same(lo, hi) -> bool [c, nk]`` and ``size [nq, 1]`` float16, as upstream's ``reg_sizes``."""
    count = rows.transpose(0, 1) @ cols.sum(1, keepdim=True)  # [nq, 1]: Σ_k Σ_r L_r(q) L_r(k), exact
    size = 1 - 1.0 * count.to(torch.float16) / (frames * frames * n)

    def same(lo: int, hi: int) -> torch.Tensor:
        return (rows[:, lo:hi].transpose(0, 1) @ cols) > 0

    return same, size


def cross_maps(lay: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lay [R, F, n]``, ``tokens [R, L]`` -> ``same bool [F n, L]`` and ``size [F n, 1]`` float32
    (1 - the area of the pixel's region in its own frame, upstream's ``reg_sizes_c``)."""
    r, f, n = lay.shape
    same = (lay.reshape(r, f * n).transpose(0, 1) @ tokens.float()) > 0
    count = (lay * lay.sum(-1, keepdim=True)).sum(0).reshape(f * n, 1)
    return same, 1 - 1.0 * count / n


def modulated(sim: torch.Tensor, same: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Scores ``[H, c, nk]`` pulled toward the row max where ``same``, pushed toward the row min elsewhere."""
    mx, mn = sim.amax(-1, keepdim=True), sim.amin(-1, keepdim=True)
    return torch.where(same, sim + weight * (mx - sim), sim - weight * (sim - mn))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Bias | None = None,
           chunk: int = 1 << 26) -> torch.Tensor:
    """``q [H, nq, d]`` over ``k, v [H, nk, d]``. With ``bias(lo, hi) -> (same [c, nk], weight [c, 1])`` the
    scores of query rows ``lo:hi`` are modulated (explicit scores, ``chunk`` elements at a time); else SDPA."""
    if bias is None:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0]
    heads, nq, _ = q.shape
    step = max(1, chunk // max(1, heads * k.shape[1]))
    out = torch.empty_like(q)
    kt = k.float().transpose(-1, -2)
    for lo in range(0, nq, step):
        hi = min(nq, lo + step)
        qc = q[:, lo:hi].float()
        sim = torch.baddbmm(torch.empty(heads, hi - lo, kt.shape[-1], dtype=qc.dtype, device=qc.device), qc, kt,
                            beta=0, alpha=scale)
        same, weight = bias(lo, hi)
        sim = modulated(sim, same[None], weight[None])
        out[:, lo:hi] = torch.bmm(sim.softmax(-1).to(v.dtype), v)
    return out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[f, n, C]`` -> ``[H, f n, d]``."""
    f, n, c = x.shape
    return x.reshape(f * n, heads, c // heads).transpose(0, 1)


def _unheads(x: torch.Tensor, f: int) -> torch.Tensor:
    """``[H, f n, d]`` -> ``[f, n, H d]``."""
    h, fn, d = x.shape
    return x.transpose(0, 1).reshape(f, fn // f, h * d)


class STLayoutAttnProcessor:
    """The UNet's attention: full-frame self-attention with anchors, ST-Layout modulation, FLATTEN and the
    PnP query/key hooks (``name``: the layer, keys of ``ctx.pnp_store``; ``pnp``: upstream records it)."""

    def __init__(self, ctx: STContext, name: str = "", pnp: bool = False) -> None:
        self.ctx, self.name, self.pnp = ctx, name, pnp

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        ctx = self.ctx
        if attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None:
            raise NotImplementedError("videograin: ST-Layout attention takes [B, N, C] tokens without masks")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        src = encoder_hidden_states if is_cross else hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(src), attn.to_v(src)
        if self.pnp and ctx.pnp == "record":
            ctx.pnp_store[self.name + ".q"], ctx.pnp_store[self.name + ".k"] = q, k
        elif self.pnp and ctx.pnp == "inject" and self.name + ".q" in ctx.pnp_store:
            q, k = _inject(q, ctx.pnp_store[self.name + ".q"], ctx), _inject(k, ctx.pnp_store[self.name + ".k"], ctx)
        batch, n, inner = q.shape
        t, a, halves = ctx.frames, ctx.anchors, ctx.halves
        f = t + a
        if batch != halves * f:
            raise RuntimeError(f"videograin: batch {batch} is not {halves} x ({t} frames + {a} anchors)")
        out = torch.empty_like(q).view(halves, f, n, inner)
        qh, kh, vh = q.view(halves, f, n, inner), k.view(halves, f, -1, inner), v.view(halves, f, -1, inner)
        for h in range(halves):
            if is_cross:
                out[h] = self._cross(qh[h], kh[h], vh[h], attn, cond=h == halves - 1)
            else:
                self._self(qh[h], kh[h], vh[h], attn, out[h], uncond=h == 0 and halves == 2 or halves == 1,
                           last=h == halves - 1)
        if not is_cross and ctx.flatten is not None and n in ctx.flatten:
            idx, mask = ctx.flatten[n]
            o = out[:, :t].reshape(halves, t * n, inner)
            qq, kk = (q, k) if ctx.old_qk == 1 else (out.reshape(batch, n, inner),) * 2
            qq = qq.view(halves, f, n, inner)[:, :t].reshape(halves, t * n, inner)
            kk = kk.view(halves, f, n, inner)[:, :t].reshape(halves, t * n, inner)
            out[:, :t] = flatten_attention(qq, kk, o, idx, mask, attn.heads, ctx.chunk).view(halves, t, n, inner)
        hidden_states = attn.to_out[1](attn.to_out[0](out.reshape(batch, n, inner)))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _modulates(self, n: int) -> bool:
        ctx = self.ctx
        return bool(ctx.modulate and ctx.layouts is not None
                    and (n < ctx.latent_hw[0] * ctx.latent_hw[1] or ctx.modulate_full_res))

    def _self(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, out: torch.Tensor,
              uncond: bool, last: bool) -> None:
        """``q, k, v [F, N, C]`` of one half; writes ``out [F, N, C]``."""
        ctx = self.ctx
        t, a = ctx.frames, ctx.anchors
        f, n, _ = q.shape
        heads = attn.heads
        if last and ctx.fingerprint is None and ctx.fingerprint_rows:
            rows = k[t:] if ctx.fingerprint_rows == "anchors" else k[:t]
            ctx.fingerprint = [float(rows.double().sum()), float(rows.double().abs().sum())]
        lay = ctx.layout(n) if uncond and self._modulates(n) else None
        for lo, hi, klo in ((0, t, 0), (t, f, t)) if a else ((0, t, 0),):
            bias = None
            if lay is not None:
                rows, cols = lay[:, lo:hi].flatten(1), lay[:, klo:].flatten(1)
                same, size = self_maps(rows, cols, f - klo, n)
                w = size * ctx.sreg * ctx.treg  # float16, as upstream's

                def bias(c0: int, c1: int, same=same, w=w) -> tuple[torch.Tensor, torch.Tensor]:
                    return same(c0, c1), w[c0:c1]

            o = attend(_heads(q[lo:hi], heads), _heads(k[klo:], heads), _heads(v[klo:], heads), attn.scale, bias,
                       ctx.chunk)
            out[lo:hi] = _unheads(o, hi - lo)

    def _cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, cond: bool) -> torch.Tensor:
        """``q [F, N, C]`` over the prompt's ``k, v [F, L, C]`` (one text per half: frame 0's keys)."""
        ctx = self.ctx
        f, n, _ = q.shape
        heads = attn.heads
        bias = None
        if cond and ctx.token_regions is not None and self._modulates(n):
            same, size = cross_maps(ctx.layout(n), ctx.token_regions)
            w = size * ctx.creg * ctx.treg

            def bias(c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
                return same[c0:c1], w[c0:c1]

        o = attend(_heads(q, heads), _heads(k[:1], heads), _heads(v[:1], heads), attn.scale, bias, ctx.chunk)
        return _unheads(o, f)


def _inject(x: torch.Tensor, recorded: torch.Tensor, ctx: STContext) -> torch.Tensor:
    """``x [halves (T + A), ...]`` with its clip rows replaced by ``recorded [halves T, ...]`` (anchors keep theirs)."""
    t, f = ctx.frames, ctx.frames + ctx.anchors
    if not ctx.anchors:
        return recorded.to(x.dtype)
    x = x.clone()
    x.view(ctx.halves, f, *x.shape[1:])[:, :t] = recorded.view(ctx.halves, t, *x.shape[1:]).to(x.dtype)
    return x
