"""Optical flow (``actors/flow.py``): DIS recovers known motion in farm's convention; RAFT's path refuses
clearly what it cannot run (torchvision is not installable beside this torch, so RAFT itself is not run here)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from actors.flow import FlowError, blur, estimate_flow, warp


def texture(h: int = 200, w: int = 260, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    big = blur(torch.rand(1, 3, h, w, generator=g), 2.0)
    return (big - big.min()) / (big.max() - big.min())


def test_dis_recovers_known_shifts_in_farm_convention() -> None:
    """``b`` is ``a`` moved by ``d`` (whole and fractional px): ``estimate_flow(a, b)`` is ``d`` with
    ``a(x) = b(x + d)``, and warping ``b`` back by it gives ``a``."""
    big = texture()
    a = big[..., 30:158, 30:222]
    for dx, dy in ((3.0, -2.0), (-9.0, 5.0), (0.5, -1.5), (12.0, 7.0)):
        f = torch.zeros(1, 2, *big.shape[-2:])
        f[:, 0], f[:, 1] = -dx, -dy
        b = warp(big, f)[..., 30:158, 30:222]  # b(x) = a(x - d)
        flow = estimate_flow(a, b)
        assert flow.shape == (1, 2, 128, 192) and flow.dtype == torch.float32
        core = flow[0, :, 16:-16, 16:-16]
        assert abs(core[0].median().item() - dx) < 0.1 and abs(core[1].median().item() - dy) < 0.1, (dx, dy)
        assert (core[0] - dx).abs().mean().item() < 0.1
        residual = (warp(b, flow) - a)[..., 16:-16, 16:-16].abs().mean().item()
        assert residual < 0.01


def test_dis_batches_and_greyscale() -> None:
    big = texture()
    a = big[..., 30:158, 30:222]
    f = torch.zeros(1, 2, *big.shape[-2:])
    f[:, 0] = -4.0
    b = warp(big, f)[..., 30:158, 30:222]
    both = estimate_flow(torch.cat([a, b]), torch.cat([b, a]))  # forward and backward in one call
    assert abs(both[0, 0, 16:-16, 16:-16].median().item() - 4.0) < 0.1
    assert abs(both[1, 0, 16:-16, 16:-16].median().item() + 4.0) < 0.1
    grey = estimate_flow(a.mean(1, keepdim=True), b.mean(1, keepdim=True))
    assert abs(grey[0, 0, 16:-16, 16:-16].median().item() - 4.0) < 0.1


def test_bad_method_and_raft_without_weights_or_torchvision_are_one_line_errors(tmp_path) -> None:
    a = torch.rand(1, 3, 32, 32)
    with pytest.raises(FlowError, match="flow method must be one of dis, raft"):
        estimate_flow(a, a, method="farneback")
    with pytest.raises(ValueError, match="must both be"):
        estimate_flow(a, a[..., :16])
    with pytest.raises(FlowError, match="needs weights"):
        estimate_flow(a, a, method="raft")
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(FlowError, match="needs torchvision") as e:
            estimate_flow(a, a, method="raft", weights=str(tmp_path / "raft_large.pth"))
        assert "\n" not in str(e.value)
    else:  # torchvision present: a file that is no raft_large state dict is refused by name
        (tmp_path / "raft_large.safetensors").write_bytes(b"not weights")
        with pytest.raises(FlowError, match="raft_large"):
            estimate_flow(a, a, method="raft", weights=str(tmp_path / "raft_large.safetensors"))


def test_dis_flow_of_a_pair_does_not_depend_on_the_batch() -> None:
    """A pair's flow is the same alone or inside a batch (shards that share frames must get the same flow)."""
    big = texture(120, 200, seed=5)
    frames = []
    for i in range(9):
        f = torch.zeros(1, 2, *big.shape[-2:])
        f[:, 0], f[:, 1] = 1.5 * i, -0.5 * i * i
        frames.append(warp(big, f)[..., 10:106, 10:170])
    x = torch.nn.functional.interpolate(torch.cat(frames), size=(24, 40), mode="area")  # VOID's tiny flow grids too
    batch = estimate_flow(x[:-1], x[1:])
    for i in range(8):
        assert torch.equal(batch[i : i + 1], estimate_flow(x[i : i + 1], x[i + 1 : i + 2])), i
