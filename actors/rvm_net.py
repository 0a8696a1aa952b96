"""Robust Video Matting (Lin et al., 2021) in plain torch: no torchvision, no timm.

Module names and parameter shapes follow the official ``MattingNetwork`` (whose backbones are torchvision's
MobileNetV3-Large and ResNet-50), so the published checkpoints and farm's reference files load with
``strict=True``. Every layer that is per-frame runs on frames flattened into the batch (``[B*T, C, H, W]``);
only the ConvGRUs see time. The official code has separate single-frame and time-series paths that compute
the same thing; one path here keeps the file short.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VARIANTS = ("mobilenetv3", "resnet50")
REFINERS = ("deep_guided_filter", "fast_guided_filter")

# (in, kernel, expanded, out, squeeze-excite, activation, stride, dilation): torchvision's MobileNetV3-Large
# table with RVM's change: the last stage keeps stride 16 and dilates by 2 instead (taps after 1, 3, 6, 16).
_MBV3_BLOCKS = [
    (16, 3, 16, 16, False, "RE", 1, 1),
    (16, 3, 64, 24, False, "RE", 2, 1),  # -> f2 after block 3 (1/4)
    (24, 3, 72, 24, False, "RE", 1, 1),
    (24, 5, 72, 40, True, "RE", 2, 1),  # -> f3 after block 6 (1/8)
    (40, 5, 120, 40, True, "RE", 1, 1),
    (40, 5, 120, 40, True, "RE", 1, 1),
    (40, 3, 240, 80, False, "HS", 2, 1),
    (80, 3, 200, 80, False, "HS", 1, 1),
    (80, 3, 184, 80, False, "HS", 1, 1),
    (80, 3, 184, 80, False, "HS", 1, 1),
    (80, 3, 480, 112, True, "HS", 1, 1),
    (112, 3, 672, 112, True, "HS", 1, 1),
    (112, 5, 672, 160, True, "HS", 2, 2),  # stride dropped for the dilation: stays at 1/16
    (160, 5, 960, 160, True, "HS", 1, 2),
    (160, 5, 960, 160, True, "HS", 1, 2),
]

# torchvision builds MobileNetV3 with these BatchNorm settings; eps matters for exact outputs.
_MbBN = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (gives the squeeze-excite widths, e.g. 72 // 4 = 18 -> 24)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = None,
) -> nn.Sequential:
    """torchvision's ConvBNActivation: keys ``.0`` conv, ``.1`` BatchNorm (the activation has none)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 * dilation, dilation, groups, bias=False),
        _MbBN(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate of MobileNetV3: global pool -> fc1 -> ReLU -> fc2 -> hard sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)  # [N, C, 1, 1]
        s = self.fc2(F.relu(self.fc1(s)))
        return x * F.hardsigmoid(s)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: optional 1x1 expand, depthwise conv, optional SE, 1x1 project, residual."""

    def __init__(
        self, cin: int, k: int, exp: int, cout: int, se: bool, act: str, stride: int, dilation: int
    ) -> None:
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn_act(cin, exp, 1, act=act_layer))
        layers.append(_conv_bn_act(exp, exp, k, 1 if dilation > 1 else stride, dilation, exp, act_layer))
        if se:
            layers.append(SqueezeExcitation(exp))
        layers.append(_conv_bn_act(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3LargeEncoder(nn.Module):
    """Features at 1/2, 1/4, 1/8, 1/16 (16, 24, 40, 960 channels); applies ImageNet normalization itself."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 16, 3, stride=2, act=nn.Hardswish)]
        layers += [InvertedResidual(*cfg) for cfg in _MBV3_BLOCKS]
        layers.append(_conv_bn_act(160, 960, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)  # 17 entries, indexed as in torchvision

    def forward(self, x: Tensor) -> list[Tensor]:
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std  # [N, 3, h, w]
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (1, 3, 6, 16):
                taps.append(x)
        return taps


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: bool = False):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if downsample
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50Encoder(nn.Module):
    """Features at 1/2, 1/4, 1/8, 1/16 with 64, 256, 512, 2048 channels; layer4 dilated instead of strided.

    Like the official RVM, this variant takes the [0, 1] image without ImageNet normalization.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._layer(64, 64, 3, stride=1)
        self.layer2 = self._layer(256, 128, 4, stride=2)
        self.layer3 = self._layer(512, 256, 6, stride=2)
        # replace_stride_with_dilation for layer4: first block keeps dilation 1, the rest use 2.
        self.layer4 = nn.Sequential(
            Bottleneck(1024, 512, 1, 1, downsample=True),
            Bottleneck(2048, 512, 1, 2),
            Bottleneck(2048, 512, 1, 2),
        )

    @staticmethod
    def _layer(cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(cin, planes, stride, downsample=True)]
        layers += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        f1 = F.relu(self.bn1(self.conv1(x)))  # [N, 64, h/2, w/2]
        x = F.max_pool2d(f1, 3, 2, 1)
        f2 = self.layer1(x)  # [N, 256, h/4, w/4]
        f3 = self.layer2(f2)  # [N, 512, h/8, w/8]
        f4 = self.layer4(self.layer3(f3))  # [N, 2048, h/16, w/16]
        return [f1, f2, f3, f4]


class LRASPP(nn.Module):
    """Lite R-ASPP: 1x1 conv features gated by a global-context sigmoid."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.aspp1 = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
        self.aspp2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.aspp1(x) * self.aspp2(x)


class ConvGRU(nn.Module):
    """Convolutional GRU over time; the hidden state has half the block's channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.ih = nn.Sequential(nn.Conv2d(channels * 2, channels * 2, 3, padding=1), nn.Sigmoid())
        self.hh = nn.Sequential(nn.Conv2d(channels * 2, channels, 3, padding=1), nn.Tanh())

    def forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        # x: [B, T, C, H, W]; h: [B, C, H, W] or None (zeros: a cold start)
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        out = []
        for xt in x.unbind(1):
            r, z = self.ih(torch.cat([xt, h], 1)).split(self.channels, 1)
            c = self.hh(torch.cat([xt, r * h], 1))
            h = (1 - z) * h + z * c
            out.append(h)
        return torch.stack(out, 1), h


def _gru_half(gru: ConvGRU, x: Tensor, r: Tensor | None, bt: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Run the GRU on the second half of the channels of ``x`` ([B*T, C, H, W]); the first half passes."""
    a, b = x.split(x.shape[1] // 2, 1)
    b, r = gru(b.unflatten(0, bt), r)
    return torch.cat([a, b.flatten(0, 1)], 1), r


class BottleneckBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gru = ConvGRU(channels // 2)

    def forward(self, x: Tensor, r: Tensor | None, bt: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return _gru_half(self.gru, x, r, bt)


def _up2(x: Tensor, like: Tensor) -> Tensor:
    """2x bilinear upsampling cropped to ``like``'s size (odd sizes round up on the way down)."""
    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return x[:, :, : like.shape[2], : like.shape[3]]


class UpsamplingBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, csrc: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + cskip + csrc, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)
        )
        self.gru = ConvGRU(cout // 2)

    def forward(
        self, x: Tensor, f: Tensor, s: Tensor, r: Tensor | None, bt: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        x = self.conv(torch.cat([_up2(x, s), f, s], 1))
        return _gru_half(self.gru, x, r, bt)


class OutputBlock(nn.Module):
    def __init__(self, cin: int, csrc: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin + csrc, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
        )

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return self.conv(torch.cat([_up2(x, s), s], 1))


class RecurrentDecoder(nn.Module):
    def __init__(self, feat: list[int], dec: list[int]) -> None:
        super().__init__()
        self.decode4 = BottleneckBlock(feat[3])
        self.decode3 = UpsamplingBlock(feat[3], feat[2], 3, dec[0])
        self.decode2 = UpsamplingBlock(dec[0], feat[1], 3, dec[1])
        self.decode1 = UpsamplingBlock(dec[1], feat[0], 3, dec[2])
        self.decode0 = OutputBlock(dec[2], 3, dec[3])

    def forward(
        self, s0: Tensor, f: list[Tensor], rec: list[Tensor | None], bt: tuple[int, int]
    ) -> tuple[Tensor, list[Tensor]]:
        # s0: [B*T, 3, h, w]; the image pyramid rounds odd sizes up, matching the encoder's strides.
        pool = partial(F.avg_pool2d, kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False)
        s1 = pool(s0)
        s2 = pool(s1)
        s3 = pool(s2)
        r1, r2, r3, r4 = rec
        x4, r4 = self.decode4(f[3], r4, bt)
        x3, r3 = self.decode3(x4, f[2], s3, r3, bt)
        x2, r2 = self.decode2(x3, f[1], s2, r2, bt)
        x1, r1 = self.decode1(x2, f[0], s1, r1, bt)
        return self.decode0(x1, s0), [r1, r2, r3, r4]  # [B*T, 16, h, w]


class Projection(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


class DeepGuidedFilterRefiner(nn.Module):
    """Guided-filter upsampling whose linear coefficients come from a small learned 1x1 conv net."""

    def __init__(self, hid: int = 16) -> None:
        super().__init__()
        self.box_filter = nn.Conv2d(4, 4, 3, padding=1, bias=False, groups=4)
        self.box_filter.weight.data[...] = 1 / 9
        self.conv = nn.Sequential(
            nn.Conv2d(4 * 2 + hid, hid, 1, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU(True),
            nn.Conv2d(hid, hid, 1, bias=False),
            nn.BatchNorm2d(hid),
            nn.ReLU(True),
            nn.Conv2d(hid, 4, 1, bias=True),
        )

    def forward(
        self, fine_src: Tensor, base_src: Tensor, base_fgr: Tensor, base_pha: Tensor, base_hid: Tensor
    ) -> tuple[Tensor, Tensor]:
        # fine_src [N, 3, H, W]; base_* at the low resolution: src/fgr [N, 3, h, w], pha [N, 1], hid [N, 16]
        fine_x = torch.cat([fine_src, fine_src.mean(1, keepdim=True)], 1)
        base_x = torch.cat([base_src, base_src.mean(1, keepdim=True)], 1)
        base_y = torch.cat([base_fgr, base_pha], 1)
        mean_x = self.box_filter(base_x)
        mean_y = self.box_filter(base_y)
        cov_xy = self.box_filter(base_x * base_y) - mean_x * mean_y
        var_x = self.box_filter(base_x * base_x) - mean_x * mean_x
        A = self.conv(torch.cat([cov_xy, var_x, base_hid], 1))
        b = mean_y - A * mean_x
        size = (fine_src.shape[2], fine_src.shape[3])
        out = _resize(A, size) * fine_x + _resize(b, size)
        fgr, pha = out.split([3, 1], 1)
        return fgr, pha


def _box_filter(x: Tensor, r: int) -> Tensor:
    """Separable (2r+1)-box mean with zero padding, as two depthwise convs (as the official code does)."""
    k = 2 * r + 1
    c = x.shape[1]
    x = F.conv2d(x, x.new_full((c, 1, 1, k), 1 / k), padding=(0, r), groups=c)
    return F.conv2d(x, x.new_full((c, 1, k, 1), 1 / k), padding=(r, 0), groups=c)


class FastGuidedFilterRefiner(nn.Module):
    """Classic fast guided filter (radius 1, eps 1e-5); no parameters."""

    def __init__(self, r: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.r, self.eps = r, eps

    def forward(
        self, fine_src: Tensor, base_src: Tensor, base_fgr: Tensor, base_pha: Tensor, base_hid: Tensor
    ) -> tuple[Tensor, Tensor]:
        lr_x = torch.cat([base_src, base_src.mean(1, keepdim=True)], 1)  # [N, 4, h, w]
        lr_y = torch.cat([base_fgr, base_pha], 1)
        hr_x = torch.cat([fine_src, fine_src.mean(1, keepdim=True)], 1)  # [N, 4, H, W]
        mean_x = _box_filter(lr_x, self.r)
        mean_y = _box_filter(lr_y, self.r)
        cov_xy = _box_filter(lr_x * lr_y, self.r) - mean_x * mean_y
        var_x = _box_filter(lr_x * lr_x, self.r) - mean_x * mean_x
        A = cov_xy / (var_x + self.eps)
        b = mean_y - A * mean_x
        size = (hr_x.shape[2], hr_x.shape[3])
        fgr, pha = (_resize(A, size) * hr_x + _resize(b, size)).split([3, 1], 1)
        return fgr, pha


class MattingNetwork(nn.Module):
    """RVM: ``fgr, pha, r1, r2, r3, r4 = net(src, r1, r2, r3, r4, downsample_ratio)``.

    ``src`` is RGB in [0, 1], ``[B, T, 3, H, W]`` or ``[B, 3, H, W]``; the ``r*`` are the recurrent states
    (``None`` = zeros). The network runs at ``downsample_ratio`` and, when that is not 1, the refiner brings
    the result back to full resolution.
    """

    def __init__(self, variant: str = "mobilenetv3", refiner: str = "deep_guided_filter") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS} (got {variant!r})")
        if refiner not in REFINERS:
            raise ValueError(f"refiner must be one of {REFINERS} (got {refiner!r})")
        self.backbone: nn.Module
        if variant == "mobilenetv3":
            self.backbone = MobileNetV3LargeEncoder()
            self.aspp = LRASPP(960, 128)
            self.decoder = RecurrentDecoder([16, 24, 40, 128], [80, 40, 32, 16])
        else:
            self.backbone = ResNet50Encoder()
            self.aspp = LRASPP(2048, 256)
            self.decoder = RecurrentDecoder([64, 256, 512, 256], [128, 64, 32, 16])
        self.project_mat = Projection(16, 4)
        self.project_seg = Projection(16, 1)  # segmentation head: trained, unused for matting
        self.refiner: nn.Module = (
            DeepGuidedFilterRefiner() if refiner == "deep_guided_filter" else FastGuidedFilterRefiner()
        )

    def forward(
        self,
        src: Tensor,
        r1: Tensor | None = None,
        r2: Tensor | None = None,
        r3: Tensor | None = None,
        r4: Tensor | None = None,
        downsample_ratio: float = 1.0,
        segmentation_pass: bool = False,
    ) -> list[Tensor]:
        single = src.ndim == 4
        if single:
            src = src.unsqueeze(1)  # a lone frame is a clip of length 1
        bt = (src.shape[0], src.shape[1])
        x = src.flatten(0, 1)  # [B*T, 3, H, W]
        if downsample_ratio != 1:
            # recompute_scale_factor=False: sample with the ratio itself, as the official code does
            x_sm = F.interpolate(
                x,
                scale_factor=downsample_ratio,
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
        else:
            x_sm = x
        f = self.backbone(x_sm)
        f[3] = self.aspp(f[3])
        hid, rec = self.decoder(x_sm, f, [r1, r2, r3, r4], bt)  # hid [B*T, 16, h, w]

        def shape(t: Tensor) -> Tensor:
            t = t.unflatten(0, bt)
            return t.squeeze(1) if single else t

        if segmentation_pass:
            return [shape(self.project_seg(hid)), *rec]
        fgr_res, pha = self.project_mat(hid).split([3, 1], 1)
        if downsample_ratio != 1:
            fgr_res, pha = self.refiner(x, x_sm, fgr_res, pha, hid)
        fgr = (fgr_res + x).clamp(0.0, 1.0)
        pha = pha.clamp(0.0, 1.0)
        return [shape(fgr), shape(pha), *rec]


def small_size(height: int, width: int, downsample_ratio: float) -> tuple[int, int]:
    """The size the network works at: ``F.interpolate``'s floor(size * ratio) (unchanged at ratio 1)."""
    if downsample_ratio == 1:
        return height, width
    return math.floor(float(height) * downsample_ratio), math.floor(float(width) * downsample_ratio)


def state_shapes(
    variant: str, height: int, width: int, downsample_ratio: float, batch: int = 1
) -> dict[str, tuple[int, int, int, int]]:
    """Shapes of r1..r4 (at 1/2, 1/4, 1/8, 1/16 of the working size, odd sizes rounded up)."""
    h, w = small_size(height, width, downsample_ratio)
    channels = (16, 20, 40, 64) if variant == "mobilenetv3" else (16, 32, 64, 128)
    return {
        f"r{i + 1}": (batch, c, -(-h // 2 ** (i + 1)), -(-w // 2 ** (i + 1))) for i, c in enumerate(channels)
    }
