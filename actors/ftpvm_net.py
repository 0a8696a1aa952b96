"""FTP-VM network ("End-to-End Video Matting With Trimap Propagation", CVPR 2023) in plain torch.

Module names and parameter shapes follow the official ``FastTrimapPropagationVideoMatting`` (with a
timm 0.9 ``mobilenetv3_large_100`` features-only backbone), so the published checkpoints load with
``strict=True``. Tensors are time series ``[B, T, C, H, W]`` throughout, as in the official code.

Data flow: the memory frame and its trimap are encoded once into a stride-16 feature (the memory key
source) and a trimap-aware value. Each query chunk is encoded by the backbone; its stride-16 feature
reads the memory value through dot-product attention, is fused, and then feeds a segmentation
decoder (3-class trimap logits at 1/4) and a matting decoder (boundary alpha at full resolution),
both with ConvGRU states carried across chunks. The two are combined into the final ("collab") matte.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rec = list[Tensor | None]

# ---------------------------------------------------------------- MobileNetV3-Large (timm layout)

# (kind, kernel, stride, mid channels, out channels, squeeze-excite, activation) per block, per stage.
_MNV3_LARGE: list[list[tuple[str, int, int, int, int, bool, str]]] = [
    [("ds", 3, 1, 16, 16, False, "relu")],
    [("ir", 3, 2, 64, 24, False, "relu"), ("ir", 3, 1, 72, 24, False, "relu")],
    [("ir", 5, 2, 72, 40, True, "relu")] + [("ir", 5, 1, 120, 40, True, "relu")] * 2,
    [("ir", 3, 2, 240, 80, False, "hswish"), ("ir", 3, 1, 200, 80, False, "hswish")]
    + [("ir", 3, 1, 184, 80, False, "hswish")] * 2,
    [("ir", 3, 1, 480, 112, True, "hswish"), ("ir", 3, 1, 672, 112, True, "hswish")],
    [("ir", 5, 2, 672, 160, True, "hswish")] + [("ir", 5, 1, 960, 160, True, "hswish")] * 2,
    [("cn", 1, 1, 960, 960, False, "hswish")],
]
# features_only, out_indices (0, 1, 2, 3): the outputs of stages 0, 1, 2 and 4 (strides 2, 4, 8, 16).
_FEATURE_STAGES = (0, 1, 2, 4)
BACKBONE_CHANNELS = [16, 24, 40, 112]


def _act(name: str, x: Tensor) -> Tensor:
    return F.relu(x) if name == "relu" else F.hardswish(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """timm's channel rounding (squeeze-excite widths): nearest multiple, never below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        rd = _make_divisible(ch * 0.25)
        self.conv_reduce = nn.Conv2d(ch, rd, 1)
        self.conv_expand = nn.Conv2d(rd, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.conv_expand(F.relu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * F.hardsigmoid(s)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act, self.skip = act, stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_pw(_act(self.act, self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se: bool, act: str) -> None:
        super().__init__()
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)
        self.act, self.skip = act, stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = _act(self.act, self.bn1(self.conv_pw(x)))
        y = self.se(_act(self.act, self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


class ConvBnAct(nn.Module):
    def __init__(self, cin: int, cout: int, act: str) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return _act(self.act, self.bn1(self.conv(x)))


class MobileNetV3Features(nn.Module):
    """timm ``mobilenetv3_large_100(features_only=True, out_indices=(0, 1, 2, 3))``, eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for stage in _MNV3_LARGE:
            blocks: list[nn.Module] = []
            for kind, k, s, mid, cout, se, act in stage:
                if kind == "ds":
                    blocks.append(DepthwiseSeparable(cin, cout, k, s, act))
                elif kind == "ir":
                    blocks.append(InvertedResidual(cin, mid, cout, k, s, se, act))
                else:
                    blocks.append(ConvBnAct(cin, cout, act))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.hardswish(self.bn1(self.conv_stem(x)))  # [N, 16, H/2, W/2]
        feats = []
        # Stages 5 and 6 (stride 32) feed no output: their weights exist only for the checkpoint layout.
        for i, stage in enumerate(self.blocks[: _FEATURE_STAGES[-1] + 1]):
            x = stage(x)
            if i in _FEATURE_STAGES:
                feats.append(x)
        return feats  # [N,16,H/2,W/2], [N,24,H/4,W/4], [N,40,H/8,W/8], [N,112,H/16,W/16]


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV3Features()

    def forward(self, x: Tensor) -> list[Tensor]:
        b, t = x.shape[:2]
        return [f.unflatten(0, (b, t)) for f in self.backbone(x.flatten(0, 1))]


# ---------------------------------------------------------------- shared blocks


def _frames(fn, x: Tensor) -> Tensor:
    """Apply a per-image function to ``[B, T, C, H, W]`` by folding time into the batch."""
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _avgpool_pyramid(x: Tensor, num: int) -> list[Tensor]:
    """Images at 1/2, 1/4, ... (``num`` levels) of ``[B, T, C, H, W]``; odd sizes round up."""
    out, y = [], x.flatten(0, 1)
    for _ in range(num):
        y = F.avg_pool2d(y, 2, 2, ceil_mode=True, count_include_pad=False)
        out.append(y.unflatten(0, x.shape[:2]))
    return out


class Projection(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return _frames(self.conv, x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.conv2(F.relu(self.conv1(F.relu(x))))


class GatedConv2d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout * 2, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.conv(x).chunk(2, dim=1)
        return F.leaky_relu(x, 0.1) * torch.sigmoid(gate)


class ConvGRU(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.ih = nn.Sequential(nn.Conv2d(ch * 2, ch * 2, 3, padding=1), nn.Sigmoid())
        self.hh = nn.Sequential(nn.Conv2d(ch * 2, ch, 3, padding=1), nn.Tanh())

    def forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, T, C, H, W]``, ``h`` ``[B, C, H, W]`` or None (zeros); frames run in order."""
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        out = []
        for xt in x.unbind(1):
            r, z = self.ih(torch.cat([xt, h], 1)).split(self.ch, 1)
            c = self.hh(torch.cat([xt, r * h], 1))
            h = (1 - z) * h + z * c
            out.append(h)
        return torch.stack(out, 1), h


def _half_gru(gru: ConvGRU, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the GRU on the second half of the channels only (RVM's bottleneck trick)."""
    a, b = x.split(x.shape[2] // 2, dim=2)
    b, h = gru(b, h)
    return torch.cat([a, b], 2), h


class GRUUpsamplingBlock(nn.Module):
    """Upsample x2, crop to the skip's size, concat skip + image, conv-BN-ReLU, half-GRU."""

    def __init__(self, cin: int, cskip: int, csrc: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + cskip + csrc, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
        )
        self.gru = ConvGRU(cout // 2)

    def forward(self, x: Tensor, skips: list[Tensor], h: Tensor | None) -> tuple[Tensor, Tensor]:
        bt, (hh, ww) = x.shape[:2], skips[-1].shape[-2:]
        x = F.interpolate(x.flatten(0, 1), scale_factor=2.0, mode="bilinear", align_corners=False)
        x = torch.cat([x[:, :, :hh, :ww]] + [s.flatten(0, 1) for s in skips], 1)
        return _half_gru(self.gru, self.conv(x).unflatten(0, bt), h)


# ---------------------------------------------------------------- memory: trimap fusion and read-out


class TrimapGatedFusion(nn.Module):
    """Encode (memory frame features, trimap) into the memory value at stride 16."""

    def __init__(self, ch_feats: list[int], ch_mask: int = 1) -> None:
        super().__init__()
        self.gated_convs = nn.ModuleList(
            nn.Sequential(
                GatedConv2d(c + ch_mask + (ch_feats[i - 1] if i else 0), c),
                nn.GroupNorm(4, c),
                nn.Conv2d(c, c, 3, 1, 1),
                nn.LeakyReLU(0.2),
                nn.GroupNorm(4, c),
                nn.AvgPool2d(2) if i < 3 else nn.Identity(),
            )
            for i, c in enumerate(ch_feats)
        )

    def forward(self, mask: Tensor, feats: list[Tensor]) -> Tensor:
        masks = _avgpool_pyramid(mask, 4)  # [B, T, 1, H/2 .. H/16]
        f = None
        for i, conv in enumerate(self.gated_convs):
            parts = ([f] if f is not None else []) + [feats[i].flatten(0, 1), masks[i].flatten(0, 1)]
            f = conv(torch.cat(parts, 1))
        return f.unflatten(0, mask.shape[:2]).transpose(1, 2)  # [B, C, T, H/16, W/16]


class ChannelGate(nn.Module):
    def __init__(self, ch: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(ch, ch // reduction), nn.ReLU(), nn.Linear(ch // reduction, ch)
        )

    def forward(self, x: Tensor) -> Tensor:
        att = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))  # [N, C]
        return x * torch.sigmoid(att)[:, :, None, None]


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class SpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = _Conv(2, 1, 7)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)  # [N, 2, H, W]
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ChannelGate = ChannelGate(ch)
        self.SpatialGate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        return self.SpatialGate(self.ChannelGate(x))


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = ResBlock(cin, cout)
        self.attention = CBAM(cout)

    def forward(self, x: Tensor) -> Tensor:
        def fuse(y: Tensor) -> Tensor:
            y = self.block(y)
            return y + self.attention(y)

        return _frames(fuse, x)


class PSP(nn.Module):
    """Pyramid pooling (1, 2, 4, 8 bins) over the fused stride-16 feature."""

    def __init__(self, ch: int, ch_per: int, cout: int, sizes: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(ch, ch_per, 1, bias=False)) for s in sizes
        )
        self.bottleneck = nn.Conv2d(ch_per * len(sizes) + ch, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        def psp(y: Tensor) -> Tensor:
            size = y.shape[-2:]
            priors = [F.interpolate(s(y), size, mode="bilinear", align_corners=True) for s in self.stages]
            return F.relu(self.bottleneck(torch.cat(priors + [y], 1)))

        return _frames(psp, x)


class BottleneckFusion(nn.Module):
    """Read the memory value at each query position (softmax over memory positions), fuse, PSP."""

    def __init__(self, ch_in: int, ch_key: int, ch_value: int, ch_out: int) -> None:
        super().__init__()
        self.project_key = Projection(ch_in, ch_key)
        self.fuse = FeatureFusion(ch_in + ch_value, ch_out)
        self.bottleneck = PSP(ch_out, ch_out // 4, ch_out)

    def forward(self, f16_q: Tensor, f16_m: Tensor, value_m: Tensor) -> Tensor:
        # f16_q [B, Tq, C, h, w], f16_m [B, Tm, C, h, w], value_m [B, Cv, Tm, h, w]
        b, tq, _, h, w = f16_q.shape
        qk = self.project_key(f16_q).transpose(1, 2).flatten(2)  # [B, Ck, Tq*h*w]
        mk = self.project_key(f16_m).transpose(1, 2).flatten(2)  # [B, Ck, Tm*h*w]
        affinity = F.softmax(mk.transpose(1, 2) @ qk / math.sqrt(mk.shape[1]), dim=1)  # [B, Nm, Nq]
        read = torch.bmm(value_m.flatten(2), affinity)  # [B, Cv, Tq*h*w]
        read = read.unflatten(2, (tq, h, w)).transpose(1, 2)  # [B, Tq, Cv, h, w]
        return self.bottleneck(self.fuse(torch.cat([f16_q, read], 2)))


# ---------------------------------------------------------------- decoders


class GRUBottleneckBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.gru = ConvGRU(ch // 2)

    def forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        return _half_gru(self.gru, x, h)


class UpsampleBlock(nn.Module):
    def __init__(self, cskip: int, cup: int, cout: int) -> None:
        super().__init__()
        self.out_conv = ResBlock(cup + cskip, cout)

    def forward(self, up: Tensor, skip: Tensor) -> Tensor:
        def blk(u: Tensor, s: Tensor) -> Tensor:
            u = F.interpolate(u, scale_factor=2.0, mode="bilinear", align_corners=False)
            return self.out_conv(torch.cat([u, s], 1))

        return blk(up.flatten(0, 1), skip.flatten(0, 1)).unflatten(0, up.shape[:2])


class SegmentationDecoderTo4x(nn.Module):
    """Stride 16 -> 4 trimap decoder; GRU states at 1/8 (r8) and 1/16 (r16)."""

    def __init__(self, feat_ch: list[int], dec_ch: list[int]) -> None:
        super().__init__()
        self.decode4 = GRUBottleneckBlock(feat_ch[3])
        self.decode3 = GRUUpsamplingBlock(feat_ch[3], feat_ch[2], 3, dec_ch[0])
        self.decode2 = UpsampleBlock(3, dec_ch[0], dec_ch[1])
        self.out = ResBlock(dec_ch[1], dec_ch[2])

    def forward(
        self, img4: Tensor, img8: Tensor, f8: Tensor, f16: Tensor, r8: Tensor | None, r16: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        x16, r16 = self.decode4(f16, r16)  # [B, T, 128, H/16, W/16]
        x8, r8 = self.decode3(x16, [f8, img8], r8)  # [B, T, 96, H/8, W/8]
        x4 = self.decode2(x8, img4)  # [B, T, 48, H/4, W/4]
        return _frames(self.out, x4), r8, r16, [x4, x8, x16]


def _conv_relu_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(True), nn.BatchNorm2d(cout))


class MattingDecoderFrom4x(nn.Module):
    """Boundary matte from stride 4 (fed by the segmentation decoder's features) up to full size."""

    def __init__(self, feat_ch: list[int], ch_skips: list[int], dec_ch: list[int]) -> None:
        super().__init__()
        self.gated_s16 = _conv_relu_bn(ch_skips[0], dec_ch[0] // 2)
        self.gated_s4 = _conv_relu_bn(ch_skips[2], dec_ch[0] // 2)
        self.decode0 = ResBlock(dec_ch[0] + 3, dec_ch[0])
        self.decode0_1 = ResBlock(feat_ch[1] + dec_ch[0], dec_ch[0])
        self.decode1 = GRUUpsamplingBlock(dec_ch[0], feat_ch[0], 3, dec_ch[1])
        self.decode2 = GRUUpsamplingBlock(dec_ch[1], 0, 3, dec_ch[2])
        self.out = ResBlock(dec_ch[2], dec_ch[3])

    def forward(
        self,
        img1: Tensor,
        img2: Tensor,
        img4: Tensor,
        f2: Tensor,
        f4: Tensor,
        s4: Tensor,
        s16: Tensor,
        r1: Tensor | None,
        r2: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        bt = img1.shape[:2]
        s16 = F.interpolate(self.gated_s16(s16.flatten(0, 1)), scale_factor=4.0)  # nearest, to 1/4
        s4 = self.gated_s4(s4.flatten(0, 1))
        x4 = self.decode0(torch.cat([s4, s16, img4.flatten(0, 1)], 1))
        x4 = self.decode0_1(torch.cat([f4.flatten(0, 1), x4], 1)).unflatten(0, bt)  # [B, T, 64, H/4, W/4]
        x2, r2 = self.decode1(x4, [f2, img2], r2)  # [B, T, 32, H/2, W/2]
        x1, r1 = self.decode2(x2, [img1], r1)  # [B, T, 16, H, W]
        return _frames(self.out, x1), r1, r2


# ---------------------------------------------------------------- refiner and helpers


def _box_filter(x: Tensor, r: int) -> Tensor:
    """Separable mean filter with zero padding (borders darken, as in the official refiner)."""
    k, c = 2 * r + 1, x.shape[1]
    kx = torch.full((c, 1, 1, k), 1 / k, device=x.device, dtype=x.dtype)
    ky = torch.full((c, 1, k, 1), 1 / k, device=x.device, dtype=x.dtype)
    x = F.conv2d(x, kx, padding=(0, r), groups=c)
    return F.conv2d(x, ky, padding=(r, 0), groups=c)


def fast_guided_filter(
    fine_src: Tensor, base_src: Tensor, base_pha: Tensor, r: int = 1, eps: float = 1e-5
) -> Tensor:
    """Upsample a low-resolution matte guided by the full-resolution image (grey), ``[N, C, H, W]``."""
    lr_x, hr_x = base_src.mean(1, keepdim=True), fine_src.mean(1, keepdim=True)
    mean_x, mean_y = _box_filter(lr_x, r), _box_filter(base_pha, r)
    cov_xy = _box_filter(lr_x * base_pha, r) - mean_x * mean_y
    var_x = _box_filter(lr_x * lr_x, r) - mean_x * mean_x
    a = cov_xy / (var_x + eps)
    b = mean_y - a * mean_x
    a = F.interpolate(a, hr_x.shape[2:], mode="bilinear", align_corners=False)
    b = F.interpolate(b, hr_x.shape[2:], mode="bilinear", align_corners=False)
    return a * hr_x + b


def pad_divide_by(x: Tensor, d: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad the last two dims to multiples of ``d``, split evenly (extra pixel at the end)."""
    h, w = x.shape[-2:]
    ph, pw = -h % d, -w % d
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, pad), pad


def collaborate_fuse(seg: Tensor, mat: Tensor) -> Tensor:
    """Final matte: ``mat`` where the trimap says unknown, 1 where foreground, 0 where background."""
    idx = torch.sigmoid(seg).max(2, keepdim=True)[1]  # classes (bg, unknown, fg); ties as the official
    return mat * (idx == 1) + (idx == 2).to(mat.dtype)


# ---------------------------------------------------------------- the network


class FTPVMNet(nn.Module):
    """``FastTrimapPropagationVideoMatting`` in its default configuration (inference only)."""

    def __init__(
        self,
        ch_bottleneck: int = 128,
        ch_key: int = 32,
        ch_seg: tuple[int, ...] = (96, 48, 16),
        ch_mat: tuple[int, ...] = (64, 32, 16, 8),
        ch_mask: int = 1,
    ) -> None:
        super().__init__()
        chs = BACKBONE_CHANNELS
        self.backbone = Backbone()
        self.trimap_fuse = TrimapGatedFusion(chs, ch_mask)
        self.bottleneck_fuse = BottleneckFusion(chs[-1], ch_key, chs[-1], ch_bottleneck)
        feat_ch = chs[:-1] + [ch_bottleneck]
        self.seg_decoder = SegmentationDecoderTo4x(feat_ch, list(ch_seg))
        self.seg_project = Projection(ch_seg[-1], 3)
        self.mat_decoder = MattingDecoderFrom4x(feat_ch, [ch_bottleneck, *ch_seg], list(ch_mat))
        self.mat_project = Projection(ch_mat[-1], 1)

    @staticmethod
    def _interpolate(x: Tensor, scale: float) -> Tensor:
        """Resize ``[B, T, C, H, W]`` by ``scale`` and pad to a multiple of 16, as the official code."""
        y = F.interpolate(
            x.flatten(0, 1),
            scale_factor=scale,
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=False,
        )
        return pad_divide_by(y, 16)[0].unflatten(0, x.shape[:2])

    def encode_imgs_to_value(
        self, imgs: Tensor, masks: Tensor, downsample_ratio: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Memory frames ``[B, T, 3, H, W]`` + trimaps ``[B, T, 1, H, W]`` (0, 0.5, 1) ->
        (stride-16 feature ``[B, T, 112, h, w]``, value ``[B, 112, T, h, w]``)."""
        if downsample_ratio != 1:
            imgs = self._interpolate(imgs, downsample_ratio)
            masks = self._interpolate(masks, downsample_ratio)
        feats = self.backbone(imgs)
        return feats[-1], self.trimap_fuse(masks, feats)

    def forward_with_memory(
        self,
        qimgs: Tensor,
        m_feat16: Tensor,
        m_value: Tensor,
        rec_seg: Rec | None = None,
        rec_mat: Rec | None = None,
        downsample_ratio: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor, list[Rec]]:
        """One chunk of query frames ``[B, T, 3, H, W]`` in [0, 1] against the encoded memory.

        Returns trimap logits ``[B, T, 3, h, w]``, boundary matte ``[B, T, 1, h, w]``, final matte
        ``[B, T, 1, H, W]`` and the GRU states ``[[r8, r16], [r1, r2]]`` for the next chunk
        (``h, w`` = ``H, W`` unless ``downsample_ratio != 1``, then the padded small size).
        """
        rec_seg = rec_seg or [None, None]
        rec_mat = rec_mat or [None, None]
        is_refine = downsample_ratio != 1
        q_sm = self._interpolate(qimgs, downsample_ratio) if is_refine else qimgs

        feats = self.backbone(q_sm)
        feats[-1] = self.bottleneck_fuse(feats[-1], m_feat16, m_value)  # [B, T, 128, h/16, w/16]
        img2, img4, img8 = _avgpool_pyramid(q_sm, 3)

        hid, r8, r16, (x4, _, x16) = self.seg_decoder(img4, img8, feats[2], feats[3], *rec_seg)
        seg = self.seg_project(hid)  # [B, T, 3, h/4, w/4] trimap logits (bg, unknown, fg)
        seg = _frames(lambda y: F.interpolate(y, scale_factor=4.0, mode="bilinear", align_corners=False), seg)
        hid, r1, r2 = self.mat_decoder(q_sm, img2, img4, feats[0], feats[1], x4, x16, *rec_mat)
        mat = torch.sigmoid(self.mat_project(hid))  # [B, T, 1, h, w]
        collab = collaborate_fuse(seg, mat)
        if is_refine:
            collab = fast_guided_filter(qimgs.flatten(0, 1), q_sm.flatten(0, 1), collab.flatten(0, 1))
            collab = collab.unflatten(0, qimgs.shape[:2])
        return seg, mat, collab, [[r8, r16], [r1, r2]]

    def forward(
        self,
        qimgs: Tensor,
        mimgs: Tensor,
        masks: Tensor,
        rec_seg: Rec | None = None,
        rec_mat: Rec | None = None,
        downsample_ratio: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor, list[Rec]]:
        """Memory and query in one call (encodes the memory every time; prefer the two-step API)."""
        m_feat16, m_value = self.encode_imgs_to_value(mimgs, masks, downsample_ratio)
        return self.forward_with_memory(qimgs, m_feat16, m_value, rec_seg, rec_mat, downsample_ratio)
