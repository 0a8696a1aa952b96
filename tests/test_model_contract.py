"""One contract over every model class (as diffusers' ``PipelineTesterMixin``): each plugin, tiny and seeded,
with the per-video media it needs (FTP-VM a trimap, VOID a quadmask video and a prompt, VideoGrain prompts and
region masks) prepared as a job's video would be, must render its declared outputs in the declared shapes,
carry its state through the ledger's npz form unchanged, render the same output under the same seed, render
the same pixels through the worker (decode, model, PNG sink) as in process, and refuse bad params with one
ModelError line. A two-pass model (``passes == 2``) is held to each of these for pass 2 (``refine``) as well:
its state runs down the chain of refines, so its round trip is the refine's handed-off state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors import load_model_class, model_names
from actors.base import ModelError, VideoContext, VideoModel
from actors.offload import MODES, Offload, memory_mode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
T, H, W, FPS = 6, 32, 48, 12
SPLIT, SHARED_FRAMES = 4, 2  # a two-pass model's refine chain in the state check: [0, 4) then [2, 6)

# A param value each model must refuse (validate_params, i.e. `farm validate`, with no weights loaded).
BAD_PARAMS: dict[str, dict[str, Any]] = {
    "keyer": {"low": 2.0},
    "rvm": {"variant": "tiny"},
    "ftpvm": {"seq_chunk": 0},
    "gvm": {"memory": "swap"},
    "void": {"steps": 0},
    "videograin": {"stregth": 0.5},
    "synthetic": {"sleep_per_frame": "slow"},
    "synthetic-2pass": {"no_such_param": 1},
}


def clip() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return np.stack([np.stack([(xx * 5 + t * 9) % 256, (yy * 7) % 256, (xx + yy + t) % 256], -1)
                     for t in range(T)]).astype(np.uint8)


def write_lossless(path: Path, frames: np.ndarray) -> str:
    """A PNG-coded video: decoding gives these exact pixels back (gray ``[T, H, W]`` frames as RGB)."""
    import av

    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    with av.open(str(path), "w") as c:
        s = c.add_stream("png", rate=FPS)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return str(path)


@dataclass
class Recipe:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    weights: Callable[[Callable[[str], Path]], str | None] = lambda tiny: None  # given conftest's tiny_weights
    media: Callable[[Path], dict[str, Any]] = lambda tmp: {}  # per-video params, with the files they name
    atol: float = 0.0  # state carried through npz vs in memory: equal, or within this


def _tiny(name: str) -> Callable[[Callable[[str], Path]], str]:
    return lambda tiny: str(tiny(name))


def _shared(rel: str) -> Callable[[Callable[[str], Path]], str]:
    def get(tiny: Callable[[str], Path]) -> str:
        if not (SHARED / rel).is_file():
            pytest.skip(f"reference weights {SHARED / rel} not found (../shared absent)")
        return str(SHARED / rel)

    return get


def _ftpvm_media(tmp: Path) -> dict[str, Any]:
    from PIL import Image

    trimap = np.full((H, W), 128, np.uint8)
    trimap[:, : W // 4], trimap[:, -W // 4 :] = 0, 255
    Image.fromarray(trimap).save(tmp / "trimap.png")
    return {"trimap": str(tmp / "trimap.png")}


def _void_media(tmp: Path) -> dict[str, Any]:
    from test_void import quadmask_clip

    return {"mask": write_lossless(tmp / "quadmask.mov", quadmask_clip(T, H, W)), "prompt": "a table with a cup"}


def _videograin_media(tmp: Path) -> dict[str, Any]:
    from PIL import Image
    from test_videograin import EDIT_A

    masks = []
    for r, (ys, xs) in enumerate(((slice(4, 20), slice(2, 22)), (slice(18, 30), slice(26, 46)))):
        m = np.zeros((H, W), np.uint8)
        m[ys, xs] = 255
        Image.fromarray(m).save(tmp / f"region{r}.png")
        masks.append(str(tmp / f"region{r}.png"))
    return {**EDIT_A, "masks": masks}


RECIPES = [
    Recipe("keyer"),
    Recipe("synthetic"),
    Recipe("synthetic-2pass"),
    Recipe("rvm", {"downsample_ratio": 0.5, "seq_chunk": 3}, _shared("rvm/rvm_mobilenetv3_random.pth"), atol=1e-5),
    Recipe("ftpvm", {"seq_chunk": 3}, _shared("ftpvm/ftpvm_random.pth"), _ftpvm_media, atol=1e-4),
    Recipe("gvm", {"size": None, "noise": "gaussian", "seed": 3}, _tiny("gvm")),
    # One denoising step per pass, one 13-frame window (the 6 frames padded), no CFG in pass 2.
    Recipe("void", {"steps": 1, "refine_steps": 1, "window_frames": 13, "window_overlap": 8,
                    "refine_guidance_scale": 1.0, "noise_scale": 8, "flow_scale": 4},
           _tiny("void"), _void_media),
    # Two denoising steps, all modulated; a 16 px model size; two anchor frames edited in prepare.
    Recipe("videograin", {"steps": 2, "modulated_steps": 2, "resolution": 16, "anchors": 2, "feather": 2,
                          "flatten_res": []}, _tiny("videograin"), _videograin_media),
]


def test_every_model_has_a_recipe() -> None:
    assert sorted(r.name for r in RECIPES) == sorted(model_names())


@dataclass
class Case:
    """One recipe made ready: its loaded model, the clip as a video, the frames decoded, the conditioning
    ``prepare`` made, and the outputs computed once for the tests that share them."""

    recipe: Recipe
    dir: Path
    weights: str | None
    url: str
    media: dict[str, Any]
    frames: np.ndarray
    model: VideoModel
    cond: Any
    done: dict[str, Any] = field(default_factory=dict)

    def fresh(self) -> VideoModel:
        """A new instance of the model, as another actor would hold."""
        return loaded(self.recipe, self.weights)

    def pass1(self) -> dict[str, np.ndarray]:
        if "pass1" not in self.done:
            self.done["pass1"] = render(self.model, self.frames, self.cond, None)[0]
        return self.done["pass1"]

    def pass2(self) -> dict[str, np.ndarray]:
        if "pass2" not in self.done:
            self.done["pass2"] = refine(self.model, self.frames, self.pass1(), self.cond)[0]
        return self.done["pass2"]


def loaded(recipe: Recipe, weights: str | None) -> VideoModel:
    model = load_model_class(recipe.name)(**recipe.params)
    model.load(weights, device="cpu", dtype="float32")
    return model


def render(model: VideoModel, frames: np.ndarray, cond: Any, state: Any, start: int = 0) -> tuple[dict, Any]:
    """``model.render`` as the worker calls it: models that read per-frame media get the frames' span."""
    if model.takes_span:
        return model.render(frames, cond, state, span=(start, start + len(frames)))
    return model.render(frames, cond, state)


def refine(model: VideoModel, frames: np.ndarray, previous: dict, cond: Any, state: Any = None, start: int = 0,
           shared_prev: int = 0, shared_next: int = 0) -> tuple[dict, Any]:
    """Pass 2 over ``frames`` (video frames from ``start``), given pass 1's outputs over the same frames."""
    span = (start, start + len(frames))
    prev = {k: v[start : start + len(frames)] if len(v) == T else v for k, v in previous.items()}
    return model.refine(frames, prev, cond, state, span, shared_prev, shared_next)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_weights) -> Callable[[Recipe], Case]:
    """Per recipe, one ``Case`` the tests share (loading and ``prepare`` are the slow parts)."""
    made: dict[str, Case] = {}

    def get(recipe: Recipe) -> Case:
        if recipe.name not in made:
            d = tmp_path_factory.mktemp(recipe.name)
            weights = recipe.weights(tiny_weights)
            url = write_lossless(d / "clip.mov", clip())
            from farm.video import read_frames

            frames = np.stack(list(read_frames(url, 0, T)))
            media = recipe.media(d)
            model = loaded(recipe, weights)
            cond = model.prepare(VideoContext(url=url, frame_count=T, width=W, height=H, fps=FPS, params=media))
            made[recipe.name] = Case(recipe, d, weights, url, media, frames, model, cond)
        return made[recipe.name]

    return get


def npz_round_trip(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """The state as the ledger keeps it for a resumed chain: saved as npz, loaded without pickles."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    with np.load(io.BytesIO(buf.getvalue()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- every class -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", model_names())
def test_class_contract(name: str) -> None:
    cls = load_model_class(name)
    assert cls.name == name and cls.outputs and cls.passes in (1, 2)
    w = cls.window
    assert w.frames >= 1 and 0 <= 2 * w.overlap <= w.frames and w.state in ("none", "handoff", "preroll")
    cls.validate_params({})  # the defaults are valid
    assert isinstance(cls().memory_bytes(), int)


@pytest.mark.parametrize("name", model_names())
def test_bad_params_are_one_line_model_errors(name: str) -> None:
    assert name in BAD_PARAMS, f"add a bad param for {name} to BAD_PARAMS"
    with pytest.raises(ModelError) as err:
        load_model_class(name).validate_params(BAD_PARAMS[name])
    message = str(err.value)
    assert message.startswith(f"{name.split('-')[0]}") and "\n" not in message


# ---- rendering ---------------------------------------------------------------------------------


def check_outputs(model: VideoModel, out: dict[str, np.ndarray]) -> None:
    assert set(model.outputs) <= set(out)
    for k in model.outputs:
        v = out[k]
        assert v.shape[:3] == (T, H, W) and v.dtype == np.float32, (k, v.shape, v.dtype)
        assert v.shape[3] == (1 if k == "alpha" else 3), (k, v.shape)
        assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1, k


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_outputs_and_shapes(recipe: Recipe, cases) -> None:
    case = cases(recipe)
    check_outputs(case.model, case.pass1())
    if case.model.passes == 2:
        check_outputs(case.model, case.pass2())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_state_round_trips_through_the_ledger_form(recipe: Recipe, cases) -> None:
    """A handed-off state saved as npz (how the ledger keeps it for a resumed chain) renders the next
    frames exactly as the state held in memory does. A two-pass model's pass 1 hands nothing on (its
    shards are independent windows); its refines are the chain: a refine of frames [0, 4) hands the
    state of the 2 frames it shares to the refine of [2, 6)."""
    case = cases(recipe)
    model, frames, cond = case.model, case.frames, case.cond
    _, state = render(model, frames[: T // 2], cond, None)
    if state is None:
        assert model.window.state != "handoff", "a handoff model must hand a state on"
    else:
        a, _ = render(model, frames[T // 2 :], cond, state, T // 2)
        b, _ = render(model, frames[T // 2 :], cond, npz_round_trip(state), T // 2)
        for k in model.outputs:
            np.testing.assert_allclose(a[k], b[k], atol=recipe.atol, err_msg=k)
    if model.passes == 2:
        prev, start = case.pass1(), SPLIT - SHARED_FRAMES
        _, state = refine(model, frames[:SPLIT], prev, cond, None, 0, 0, SHARED_FRAMES)
        assert state is not None, "a refine that shares frames with the next shard must hand a state on"
        a, _ = refine(model, frames[start:], prev, cond, state, start, SHARED_FRAMES)
        b, _ = refine(model, frames[start:], prev, cond, npz_round_trip(state), start, SHARED_FRAMES)
        for k in model.outputs:
            np.testing.assert_allclose(a[k], b[k], atol=recipe.atol, err_msg=f"refine {k}")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_same_output_under_the_same_seed(recipe: Recipe, cases) -> None:
    """A second instance (as another actor would hold), given the conditioning ``prepare`` made once for
    the video (as the driver hands it to every actor), renders the same numbers; pass 2 too."""
    case = cases(recipe)
    other = case.fresh()
    got = render(other, case.frames, case.cond, None)[0]
    for k, v in case.pass1().items():
        np.testing.assert_array_equal(v, got[k], err_msg=k)
    if other.passes == 2:
        got = refine(other, case.frames, case.pass1(), case.cond)[0]
        for k, v in case.pass2().items():
            np.testing.assert_array_equal(v, got[k], err_msg=f"refine {k}")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_renders_through_the_worker(recipe: Recipe, cases) -> None:
    """The actor's code in process (no Ray): ``ModelWorker`` loads the model from its config, decodes the
    clip's frames itself, renders one shard over them and writes each output as PNGs: the pixels are those
    of the model's own render, to 8-bit rounding. A two-pass model's pass 1 goes to the ledger (as 8-bit)
    and its pass 2 reads it back from there, so its PNGs are the refine of pass 1 as the ledger kept it."""
    from in_worker import render_in_worker

    from farm.stitch import to_uint8
    from farm.worker import ModelConfig, ModelWorker

    case = cases(recipe)
    worker = ModelWorker(ModelConfig(recipe.name, recipe.params, case.weights, device="cpu"))
    got = render_in_worker(worker, case.url, (T, H, W), FPS, case.cond, case.dir / "worker")
    want = case.pass1()
    if worker.model.passes == 2:
        kept = {k: to_uint8(v).astype(np.float32) / 255 for k, v in want.items()}  # what the ledger holds
        want = refine(case.model, case.frames, kept, case.cond)[0]
    assert got.keys() and set(got) <= set(want)
    for ch, pixels in got.items():
        np.testing.assert_array_equal(pixels, to_uint8(want[ch]), err_msg=ch)


# ---- the shared offload helper -----------------------------------------------------------------


class _Module:
    """Stands in for a torch module: records where it is sent."""

    def __init__(self) -> None:
        self.where: list[str] = []

    def to(self, device: Any) -> _Module:
        self.where.append(str(device))
        return self


def test_memory_modes_keep_old_names_and_refuse_others() -> None:
    assert memory_mode("gpu", "gvm") == "full" and all(memory_mode(m, "x") == m for m in MODES)
    with pytest.raises(ModelError, match=r"gvm: memory must be one of full, .*gpu \(got 'swap'\)"):
        memory_mode("swap", "gvm")
    with pytest.raises(ModelError, match="void: memory must be one of full, model_offload, sequential"):
        memory_mode("group_offload", "void", ("full", "model_offload", "sequential"))


def test_model_offload_moves_one_component_while_it_runs() -> None:
    a, b = _Module(), _Module()
    off = Offload("model_offload", "cuda:0", lambda: [a, b])
    off.place()
    assert a.where == b.where == ["cpu"]
    with off.use(a):
        assert a.where[-1] == "cuda:0" and b.where == ["cpu"]
    assert a.where[-1] == "cpu" and off.moves == 2
    full = Offload("full", "cuda:0", lambda: [a])
    full.place()
    with full.use(a):
        pass
    assert a.where[-1] == "cuda:0" and full.moves == 0
    cpu = Offload("model_offload", "cpu", lambda: [b])  # on the CPU nothing moves
    cpu.place()
    with cpu.use(b):
        pass
    assert cpu.moves == 0 and cpu.execution_device == "cpu"
