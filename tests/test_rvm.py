"""farm's RVM against the official implementation's outputs on seeded random weights (shared/reference/rvm).

The reference files pin the architecture numerically; the adapter tests pin what the farm relies on:
a render split in two with the state handed over equals one render, and a state that does not fit is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from actors.base import ModelError  # noqa: E402
from actors.rvm import RVM, auto_downsample_ratio  # noqa: E402
from actors.rvm_net import MattingNetwork, state_shapes  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "reference" / "rvm"
needs_shared = pytest.mark.skipif(
    not REF.is_dir(), reason=f"reference data not found at {REF} (../shared absent)"
)
WEIGHTS = REF / "rvm_mobilenetv3_random.pth"


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.load(REF / "input_frames.npz")["frames"]  # [36, 240, 320, 3] uint8


@pytest.fixture(scope="module")
def net() -> MattingNetwork:
    model = MattingNetwork("mobilenetv3", "deep_guided_filter")
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _run(net: MattingNetwork, frames: np.ndarray, ratio: float, chunk: int = 6, keep_at: int = 18):
    """Frames/255 in chunks, state carried, as the reference was made; plus the state after ``keep_at``."""
    src = torch.from_numpy(frames.astype(np.float32) / 255).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W]
    rec: list = [None] * 4
    alphas, fgrs, kept = [], [], None
    with torch.inference_mode():
        for i in range(0, src.shape[1], chunk):
            fgr, pha, *rec = net(src[:, i : i + chunk], *rec, downsample_ratio=ratio)
            alphas.append(pha[0])
            fgrs.append(fgr[0])
            if i + chunk == keep_at:
                kept = [r[0].numpy() for r in rec]
    return torch.cat(alphas).numpy(), torch.cat(fgrs).numpy(), kept


@needs_shared
@pytest.mark.parametrize("variant", ["mobilenetv3", "resnet50"])
def test_state_dict_layout_matches_official(variant: str) -> None:
    layout = json.loads((REF / "rvm_state_dict_layout.json").read_text())[variant]["keys"]
    mine = [[k, list(t.shape), str(t.dtype)] for k, t in MattingNetwork(variant).state_dict().items()]
    assert [row[0] for row in mine] == [row[0] for row in layout]
    assert mine == layout


@needs_shared
def test_matches_reference_dr05_with_refiner(net: MattingNetwork, frames: np.ndarray) -> None:
    ref = np.load(REF / "rvm_mobilenetv3_dr0.5_outputs.npz")
    alpha, fgr, kept = _run(net, frames, 0.5)
    assert np.abs(alpha - ref["alpha"]).max() <= 1e-4
    # the reference fgr is float16: compare at its precision (half a float16 ulp near 1 is 2.4e-4)
    assert np.abs(fgr - ref["fgr"].astype(np.float32)).max() <= 1e-3
    for i in range(4):
        assert np.abs(kept[i] - ref[f"state_after_18_rec{i}"]).max() <= 1e-4


@needs_shared
def test_matches_reference_dr1_without_refiner(net: MattingNetwork, frames: np.ndarray) -> None:
    ref = np.load(REF / "rvm_mobilenetv3_dr1.0_outputs.npz")
    alpha, _, _ = _run(net, frames, 1.0, keep_at=-1)
    assert np.abs(alpha - ref["alpha"]).max() <= 1e-4


@pytest.fixture(scope="module")
def adapter() -> RVM:
    model = RVM(variant="mobilenetv3", downsample_ratio=0.5, seq_chunk=12)
    model.load(str(WEIGHTS), device="cpu", dtype="float32")
    return model


@needs_shared
def test_adapter_handoff_equals_one_render(adapter: RVM, frames: np.ndarray) -> None:
    whole, state36 = adapter.render(frames, None, None)
    first, state18 = adapter.render(frames[:18], None, None)
    second, state36b = adapter.render(frames[18:], None, state18)
    assert whole["alpha"].shape == (36, 240, 320, 1) and whole["fgr"].shape == (36, 240, 320, 3)
    for key in ("alpha", "fgr"):
        split = np.concatenate([first[key], second[key]])
        np.testing.assert_allclose(split, whole[key], rtol=0, atol=1e-5)
    for key in ("r1", "r2", "r3", "r4"):
        np.testing.assert_allclose(state36b[key], state36[key], rtol=0, atol=1e-5)
    # and the adapter (uint8 in, [T, H, W, C] out) reproduces the official outputs too
    ref = np.load(REF / "rvm_mobilenetv3_dr0.5_outputs.npz")
    assert np.abs(whole["alpha"][..., 0] - ref["alpha"][:, 0]).max() <= 1e-4
    assert state18["r4"].shape == (1, *ref["state_after_18_rec3"].shape)
    assert np.abs(state18["r4"][0] - ref["state_after_18_rec3"]).max() <= 1e-4
    # a handoff from the official code's own state after frame 18 continues its video
    official = {f"r{i + 1}": ref[f"state_after_18_rec{i}"][None] for i in range(4)}
    resumed, _ = adapter.render(frames[18:], None, official)
    assert np.abs(resumed["alpha"][..., 0] - ref["alpha"][18:, 0]).max() <= 1e-4


@needs_shared
def test_adapter_refuses_state_from_another_resolution(adapter: RVM, frames: np.ndarray) -> None:
    _, state = adapter.render(frames[:2, :120, :160], None, None)
    with pytest.raises(ModelError, match="another resolution"):
        adapter.render(frames[:2], None, state)
    _, good = adapter.render(frames[:1], None, None)
    with pytest.raises(ModelError, match="lacks"):
        adapter.render(frames[:2], None, {"r1": good["r1"]})


def test_state_shapes_and_auto_ratio() -> None:
    assert auto_downsample_ratio(240, 320) == 1.0
    assert auto_downsample_ratio(1080, 1920) == pytest.approx(512 / 1920)
    shapes = state_shapes("mobilenetv3", 240, 320, 0.5)
    assert shapes == {
        "r1": (1, 16, 60, 80),
        "r2": (1, 20, 30, 40),
        "r3": (1, 40, 15, 20),
        "r4": (1, 64, 8, 10),
    }


def test_fast_guided_filter_and_resnet50_smoke() -> None:
    torch.manual_seed(0)
    src = torch.rand(1, 2, 3, 50, 66)  # odd sizes at 1/16 exercise the crops
    with torch.inference_mode():
        mb = MattingNetwork("mobilenetv3", "fast_guided_filter").eval()
        fgr, pha, *rec = mb(src, downsample_ratio=0.5)
        assert fgr.shape == (1, 2, 3, 50, 66) and pha.shape == (1, 2, 1, 50, 66)
        assert [tuple(r.shape) for r in rec] == list(state_shapes("mobilenetv3", 50, 66, 0.5).values())
        assert 0 <= float(pha.min()) and float(pha.max()) <= 1

        rn = MattingNetwork("resnet50", "deep_guided_filter").eval()
        fgr, pha, *rec = rn(src[:, 0], downsample_ratio=1.0)  # a single frame [B, 3, H, W]
        assert fgr.shape == (1, 3, 50, 66) and pha.shape == (1, 1, 50, 66)
        assert [tuple(r.shape) for r in rec] == list(state_shapes("resnet50", 50, 66, 1.0).values())
        seg, *_ = rn(src, *rec, segmentation_pass=True)
        assert seg.shape == (1, 2, 1, 50, 66)


def test_adapter_rejects_bad_params() -> None:
    with pytest.raises(ModelError):
        RVM(variant="vgg")
    with pytest.raises(ModelError):
        RVM(downsample_ratio=2.0)
    with pytest.raises(ModelError, match="needs weights"):
        RVM().load(None)
    with pytest.raises(ModelError, match="before load"):
        RVM().render(np.zeros((1, 8, 8, 3), np.uint8), None, None)
