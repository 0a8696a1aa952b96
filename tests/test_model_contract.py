"""One contract over every model class (as diffusers' ``PipelineTesterMixin``): each plugin, tiny and seeded,
must render its declared outputs in the declared shapes, carry its state through the ledger's npz form
unchanged, render the same output under the same seed, and refuse bad params with one ModelError line.

Class-level checks run over every registered model. Rendering runs over the models a test can build
tiny here; VOID and VideoGrain need per-video conditioning media and are rendered by their own suites.
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
from actors.base import ModelError, VideoModel
from actors.offload import MODES, Offload, memory_mode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
T, H, W = 6, 32, 48

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


@dataclass
class Recipe:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    weights: Callable[[Path], str | None] = lambda tmp: None
    cond: Callable[[VideoModel, np.ndarray], Any] = lambda model, frames: None
    atol: float = 0.0  # state carried through npz vs in memory: equal, or within this


def _gvm_weights(tmp: Path) -> str:
    from test_gvm import build_tiny_gvm

    return str(build_tiny_gvm(tmp / "gvm"))


def _shared(rel: str) -> Callable[[Path], str]:
    def get(tmp: Path) -> str:
        if not (SHARED / rel).is_file():
            pytest.skip(f"reference weights {SHARED / rel} not found (../shared absent)")
        return str(SHARED / rel)

    return get


def _ftpvm_cond(model: Any, frames: np.ndarray) -> Any:
    trimap = np.full(frames.shape[1:3], 128, np.uint8)
    trimap[:, : W // 4], trimap[:, -W // 4 :] = 0, 255
    return model.encode_memory(frames[0], trimap)


RECIPES = [
    Recipe("keyer"),
    Recipe("synthetic"),
    Recipe("synthetic-2pass"),
    Recipe("rvm", {"downsample_ratio": 0.5, "seq_chunk": 3}, _shared("rvm/rvm_mobilenetv3_random.pth"), atol=1e-5),
    Recipe("ftpvm", {"seq_chunk": 3}, _shared("ftpvm/ftpvm_random.pth"), _ftpvm_cond, atol=1e-4),
    Recipe("gvm", {"size": None, "noise": "gaussian", "seed": 3}, _gvm_weights),
]


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """Per recipe: its weights, and one loaded model the tests share (loading is the slow part)."""
    return {}


def make(recipe: Recipe, tmp: Path, cache: dict, fresh: bool = False) -> VideoModel:
    """The recipe's loaded model; ``fresh``: a new instance (as another actor would hold)."""
    if recipe.name not in cache:
        cache[recipe.name] = recipe.weights(tmp)
    if not fresh and (recipe.name, "model") in cache:
        return cache[(recipe.name, "model")]
    model = load_model_class(recipe.name)(**recipe.params)
    model.load(cache[recipe.name], device="cpu", dtype="float32")
    if not fresh:
        cache[(recipe.name, "model")] = model
    return model


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


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_outputs_and_shapes(recipe: Recipe, tmp_path_factory, built) -> None:
    model = make(recipe, tmp_path_factory.mktemp(recipe.name), built)
    frames = clip()
    out, _ = model.render(frames, recipe.cond(model, frames), None)
    assert set(model.outputs) <= set(out)
    for k in model.outputs:
        v = out[k]
        assert v.shape[:3] == (T, H, W) and v.dtype == np.float32, (k, v.shape, v.dtype)
        assert v.shape[3] == (1 if k == "alpha" else 3), (k, v.shape)
        assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1, k


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_state_round_trips_through_the_ledger_form(recipe: Recipe, tmp_path_factory, built) -> None:
    """A handed-off state saved as npz (how the ledger keeps it for a resumed chain) renders the next
    frames exactly as the state held in memory does."""
    model = make(recipe, tmp_path_factory.mktemp(recipe.name), built)
    frames = clip()
    cond = recipe.cond(model, frames)
    _, state = model.render(frames[: T // 2], cond, None)
    if state is None:
        assert model.window.state != "handoff", "a handoff model must hand a state on"
        return
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    with np.load(io.BytesIO(buf.getvalue()), allow_pickle=False) as z:
        loaded = {k: z[k] for k in z.files}
    a, _ = model.render(frames[T // 2 :], cond, state)
    b, _ = model.render(frames[T // 2 :], cond, loaded)
    for k in model.outputs:
        np.testing.assert_allclose(a[k], b[k], atol=recipe.atol, err_msg=k)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_same_output_under_the_same_seed(recipe: Recipe, tmp_path_factory, built) -> None:
    tmp = tmp_path_factory.mktemp(recipe.name)
    frames = clip()
    outs = []
    for fresh in (False, True):  # two separate instances, as two actors would hold
        model = make(recipe, tmp, built, fresh)
        outs.append(model.render(frames, recipe.cond(model, frames), None)[0])
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)


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
