"""ST-Layout attention (VideoGrain, Yang et al. ICLR 2025) as diffusers attention processors.

The UNet is 2D: the frames of a clip are its batch, ``[halves * (T + A), N, C]`` with ``halves`` = 2
under classifier-free guidance (``[uncond | cond]``), ``T`` clip frames and ``A`` anchor frames after them.

- Self-attention is space-time: the queries of every clip frame attend to the keys/values of all the
  clip's frames and of the anchor frames; anchor queries attend to the anchors only, so the anchors'
  keys/values are the same in every clip (and equal to those of the anchors' own edit in ``prepare``).
- Modulation (the first steps of editing, weighted by ``treg = ((t - 1) / 1000) ** 5``): where a query
  and a key lie in the same region (the local masks, plus the background outside all of them) the score
  is pulled toward the row's maximum, elsewhere pushed toward its minimum, scaled by ``1 - `` the share
  of keys in that region. Cross-attention does the same between region ``r``'s pixels and the tokens of
  local prompt ``r`` inside the global prompt (cond half only). Upstream leaves the full-resolution
  self-attention unmodulated (memory); so do we unless ``modulate_full_res``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class STContext:
    """What the processors need to know about the batch of the current UNet call (set per call)."""

    frames: int = 1  # T
    anchors: int = 0  # A
    halves: int = 1
    latent_hw: tuple[int, int] = (0, 0)
    layouts: torch.Tensor | None = None  # [R + 1, T + A, h, w] {0, 1} at latent res; last row = background
    token_regions: torch.Tensor | None = None  # [R, L] {0, 1}: token j is a word of local prompt r
    modulate: bool = False
    treg: float = 0.0
    sreg: float = 0.3
    creg: float = 1.0
    modulate_full_res: bool = False
    chunk: int = 1 << 26  # score elements per explicit attention chunk (memory bound)
    fingerprint_rows: str | None = None  # "anchors" or "clip": record the first self-attention keys of those rows
    fingerprint: list[float] | None = None
    _levels: dict[int, torch.Tensor] = field(default_factory=dict)

    def reset(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self, k, v)
        self._levels = {}

    def layout(self, n: int) -> torch.Tensor:
        """``[R + 1, T + A, n]``: the layouts pooled (any pixel in a cell) to the level with ``n`` tokens."""
        if n not in self._levels:
            assert self.layouts is not None
            h, w = self.latent_hw
            k = 0
            while (h >> k) * (w >> k) > n and k < 16:
                k += 1
            if (h >> k) * (w >> k) != n:
                raise RuntimeError(f"videograin: no latent level of {h}x{w} has {n} tokens")
            lay = self.layouts
            r, f = lay.shape[:2]
            pooled = F.adaptive_max_pool2d(lay.reshape(r * f, 1, h, w), (h >> k, w >> k))
            self._levels[n] = pooled.reshape(r, f, -1)
        return self._levels[n]


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[f, n, H, d]`` -> ``[H, f * n, d]``."""
    f, n, h, d = x.shape
    return x.reshape(f * n, h, d).transpose(0, 1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    strength: float = 0.0,
    chunk: int = 1 << 26,
) -> torch.Tensor:
    """Attention of ``q [H, nq, d]`` over ``k, v [H, nk, d]``. With ``bias(lo, hi) -> (same [c, nk] bool,
    size [c, nk] or [c, 1])`` the scores of query rows ``lo:hi`` are modulated as ST-Layout attention does
    (explicit scores, in chunks of ``chunk`` elements); without, a fused SDPA kernel."""
    if bias is None or strength == 0:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0]
    heads, nq, _ = q.shape
    nk = k.shape[1]
    step = max(1, chunk // max(1, heads * nk))
    out = torch.empty_like(q)
    kt = k.float().transpose(-1, -2)
    for lo in range(0, nq, step):
        hi = min(nq, lo + step)
        sim = torch.matmul(q[:, lo:hi].float(), kt) * scale  # [H, c, nk]
        same, size = bias(lo, hi)
        w = (size.float() * strength)[None]
        mx, mn = sim.amax(-1, keepdim=True), sim.amin(-1, keepdim=True)
        sim = torch.where(same[None], sim + w * (mx - sim), sim - w * (sim - mn))
        out[:, lo:hi] = torch.matmul(sim.softmax(-1).to(v.dtype), v)
    return out


def _self_bias(rows: torch.Tensor, cols: torch.Tensor) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Queries ``rows [R, nq]`` and keys ``cols [R, nk]`` in the same region; size = 1 - that region's share."""

    def bias(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        same = (rows[:, lo:hi].transpose(0, 1) @ cols) > 0  # [c, nk]
        size = 1 - same.float().mean(-1, keepdim=True)
        return same, size

    return bias


def _cross_bias(
    rows: torch.Tensor, tokens: torch.Tensor, area: torch.Tensor, n: int
) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Pixels ``rows [R, F * n]`` against tokens ``[R, L]``; size = 1 - the token's region's share of its frame
    (``area [R, F]``); tokens of no local prompt: size 1."""
    tok_area = tokens.transpose(0, 1) @ area  # [L, F]
    size_f = (1 - tok_area.transpose(0, 1)).clamp(0, 1)  # [F, L]

    def bias(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        same = (rows[:, lo:hi].transpose(0, 1) @ tokens) > 0  # [c, L]
        frame = torch.arange(lo, hi, device=rows.device) // n
        return same, size_f[frame]

    return bias


class STLayoutAttnProcessor:
    """Space-time self-attention with anchors, and layout-modulated self-/cross-attention (see module doc)."""

    def __init__(self, ctx: STContext) -> None:
        self.ctx = ctx

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctx = self.ctx
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        if attention_mask is not None:
            raise NotImplementedError("videograin: attention masks are not supported by ST-Layout attention")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        src = hidden_states
        if is_cross:
            src = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(src), attn.to_v(src)
        batch, n, inner = q.shape
        heads = attn.heads
        d = inner // heads
        t, a, halves = ctx.frames, ctx.anchors, ctx.halves
        f = t + a
        if batch != halves * f:
            raise RuntimeError(f"videograin: batch {batch} is not {halves} x ({t} frames + {a} anchors)")
        q = q.view(halves, f, n, heads, d)
        k = k.view(halves, f, -1, heads, d)
        v = v.view(halves, f, -1, heads, d)
        out = torch.empty_like(q)
        for h in range(halves):
            if is_cross:
                out[h] = self._cross(q[h], k[h], v[h], attn.scale, cond=h == halves - 1)
            else:
                self._self(q[h], k[h], v[h], attn.scale, out[h], last=h == halves - 1)

        hidden_states = out.reshape(batch, n, inner).to(q.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _self(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor,
              last: bool) -> None:
        """``q, k, v [F, N, H, d]`` of one half; writes ``out [F, N, H, d]``."""
        ctx = self.ctx
        t, a = ctx.frames, ctx.anchors
        f, n, heads, d = q.shape
        if last and ctx.fingerprint is None and ctx.fingerprint_rows:
            rows = k[t:] if ctx.fingerprint_rows == "anchors" else k[:t]
            ctx.fingerprint = [float(rows.double().sum()), float(rows.double().abs().sum())]
        h0, w0 = ctx.latent_hw
        lay = None
        if ctx.modulate and ctx.layouts is not None and (n < h0 * w0 or ctx.modulate_full_res):
            lay = ctx.layout(n)  # [R + 1, F, N]
        strength = ctx.sreg * ctx.treg
        bias = None
        if lay is not None:
            bias = _self_bias(lay[:, :t].reshape(len(lay), -1), lay.reshape(len(lay), -1))
        o = attend(_heads_first(q[:t]), _heads_first(k), _heads_first(v), scale, bias, strength, ctx.chunk)
        out[:t] = o.transpose(0, 1).reshape(t, n, heads, d)
        if a:
            bias = None
            if lay is not None:
                al = lay[:, t:].reshape(len(lay), -1)
                bias = _self_bias(al, al)
            o = attend(_heads_first(q[t:]), _heads_first(k[t:]), _heads_first(v[t:]), scale, bias, strength,
                       ctx.chunk)
            out[t:] = o.transpose(0, 1).reshape(a, n, heads, d)

    def _cross(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cond: bool) -> torch.Tensor:
        """``q [F, N, H, d]`` over the prompt's ``k, v [F, L, H, d]`` (one text per half: frame 0's keys)."""
        ctx = self.ctx
        f, n, heads, d = q.shape
        kh, vh = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [H, L, d]
        bias = None
        if cond and ctx.modulate and ctx.layouts is not None and ctx.token_regions is not None:
            lay = ctx.layout(n)[:-1]  # [R, F, N]: the local regions (no background prompt)
            bias = _cross_bias(lay.reshape(len(lay), -1), ctx.token_regions.to(lay.dtype), lay.mean(-1), n)
        o = attend(_heads_first(q), kh, vh, scale, bias, ctx.creg * ctx.treg, ctx.chunk)
        return o.transpose(0, 1).reshape(f, n, heads, d)
