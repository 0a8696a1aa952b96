"""VideoGrain's inflated ("pseudo-3D") UNet and ControlNet, built from diffusers' 2D models in place.

Upstream loads the standard SD1.5 / ControlNet state dicts into 3D classes whose convolutions run per
frame but whose resnet GroupNorms (and the UNet's ``conv_norm_out``) normalise each group over all the
frames of one CFG half at once. Here the released checkpoints load unchanged into diffusers'
``UNet2DConditionModel`` / ``ControlNetModel`` and those norms become ``FrameGroupNorm`` (same parameters,
same state-dict keys), which folds the frames of each batch segment (``STContext.segments``) into the
statistics. The transformer blocks' own GroupNorm stays per frame, as upstream's does.

Also here, as hooks on the same nets: PnP's residual-branch recording/injection in upstream's three decoder
resnets, and FreeU (Si et al., CVPR 2024) keyed on SD1.5's widths, as upstream's copy of it is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Upstream's PnP layers: decoder resnets whose residual branch is injected, attn1 layers whose q/k are.
PNP_RESNETS = ("up_blocks.1.resnets.0", "up_blocks.1.resnets.1", "up_blocks.2.resnets.0")
PNP_ATTENTIONS = tuple(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
                       for b, a in ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)))


class FrameGroupNorm(torch.nn.GroupNorm):
    """GroupNorm whose statistics span the frames of each batch segment (``ctx.segments``)."""

    ctx: Any = None

    @classmethod
    def inflate(cls, norm: torch.nn.GroupNorm, ctx: Any) -> FrameGroupNorm:
        new = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
        new.load_state_dict(norm.state_dict())
        new.to(norm.weight.device, norm.weight.dtype)
        object.__setattr__(new, "ctx", ctx)  # not a submodule
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.ctx.segments if self.ctx is not None else []
        if sum(segments) != x.shape[0]:
            raise RuntimeError(f"videograin: batch of {x.shape[0]} frames is not the segments {segments}")
        outs, lo = [], 0
        for f in segments:
            seg = x[lo : lo + f].transpose(0, 1)[None]  # [1, C, f, H, W]: upstream's 5-D layout
            y = F.group_norm(seg.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            outs.append(y[0].transpose(0, 1))
            lo += f
        return torch.cat(outs).contiguous() if len(outs) > 1 else outs[0].contiguous()


def inflate(net: Any, ctx: Any) -> None:
    """Replace ``net``'s resnet norms (and ``conv_norm_out``) by ``FrameGroupNorm`` sharing ``ctx``."""
    from diffusers.models.resnet import ResnetBlock2D

    for module in net.modules():
        if isinstance(module, ResnetBlock2D):
            module.norm1 = FrameGroupNorm.inflate(module.norm1, ctx)
            module.norm2 = FrameGroupNorm.inflate(module.norm2, ctx)
    if isinstance(getattr(net, "conv_norm_out", None), torch.nn.GroupNorm):
        net.conv_norm_out = FrameGroupNorm.inflate(net.conv_norm_out, ctx)


def add_pnp_hooks(unet: Any, ctx: Any) -> None:
    """Record (``ctx.pnp == "record"``) or replace (``"inject"``) the residual branch (``conv2``'s output,
    before the skip is added) of upstream's three PnP resnets, through ``ctx.pnp_store``."""
    from actors.videograin_attention import _inject

    modules = dict(unet.named_modules())
    for name in PNP_RESNETS:
        if name not in modules:
            continue

        def hook(_module: Any, _inputs: Any, out: torch.Tensor, name: str = name) -> torch.Tensor | None:
            if ctx.pnp == "record":
                ctx.pnp_store[name] = out
            elif ctx.pnp == "inject" and name in ctx.pnp_store:
                return _inject(out, ctx.pnp_store[name], ctx)
            return None

        modules[name].conv2.register_forward_hook(hook)


def freeu_scale(hidden: torch.Tensor, b: float) -> torch.Tensor:
    """FreeU's backbone factor: the first half of the channels times ``1 + (b - 1) m``, ``m`` each frame's
    channel-mean map min-max normalised."""
    mean = hidden.mean(1, keepdim=True)
    flat = mean.flatten(1)
    lo, hi = flat.min(-1)[0][:, None, None, None], flat.max(-1)[0][:, None, None, None]
    mean = (mean - lo) / (hi - lo)
    out = hidden.clone()
    half = hidden.shape[1] // 2
    out[:, :half] = hidden[:, :half] * ((b - 1) * mean + 1)
    return out


def add_freeu_hooks(unet: Any, b1: float, b2: float, s1: float, s2: float) -> None:
    """FreeU before every decoder resnet whose backbone input has 1280 (``b1``, ``s1``) or 640 (``b2``,
    ``s2``) channels: SD1.5's widths, as upstream keys it (other widths are left alone, as upstream)."""
    from diffusers.utils.torch_utils import fourier_filter

    prev = unet.config.block_out_channels[-1]
    for block in unet.up_blocks:
        for i, resnet in enumerate(block.resnets):
            backbone = prev if i == 0 else resnet.out_channels
            factors = {1280: (b1, s1), 640: (b2, s2)}.get(backbone)
            if factors is None:
                continue

            def hook(_module: Any, args: tuple, backbone: int = backbone, factors: tuple = factors) -> tuple:
                x, rest = args[0], args[1:]
                b, s = factors
                hidden = freeu_scale(x[:, :backbone], b)
                skip = fourier_filter(x[:, backbone:], threshold=1, scale=s)
                return (torch.cat([hidden, skip], dim=1), *rest)

            resnet.register_forward_pre_hook(hook)
        prev = block.resnets[-1].out_channels
