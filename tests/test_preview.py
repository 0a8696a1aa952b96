"""farm preview: contact sheets of a real (keyer) render, and every job file in jobs/ validates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from farm.cli import main
from farm.driver import run_job
from farm.preview import GUTTER, HEADER, PAD, PreviewError, contact_sheet, preview_job, spread_frames
from farm.sample import write_sample
from farm.spec import load_spec, parse_spec
from farm.video import read_frames

ROOT = Path(__file__).resolve().parents[1]
W, H, T = 96, 64, 24


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.y*ml")), ids=lambda p: p.name)
def test_job_files_validate(path):
    spec = load_spec(path)
    assert spec.name


def test_job_files_include_recurrent_examples():
    names = {p.name for p in (ROOT / "jobs").glob("*.yaml")}
    assert {"rvm.yaml", "ftpvm.yaml"} <= names
    assert load_spec(ROOT / "jobs/rvm.yaml").model.weights == "rvm-mobilenetv3"
    assert "trimap" in load_spec(ROOT / "jobs/ftpvm.yaml").model.params


def test_spread_frames():
    assert spread_frames(24, 3) == [0, 12, 23]
    assert spread_frames(120, 4) == [0, 40, 79, 119]
    assert spread_frames(2, 4) == [0, 1]
    assert spread_frames(1, 4) == [0]


@pytest.fixture(scope="module")
def keyed(ray_session, tmp_path_factory):
    """A tiny keyer render (mp4 alpha + comp) and its job file."""
    d = tmp_path_factory.mktemp("preview")
    video, _ = write_sample(str(d / "clip.mp4"), frames=T, width=W, height=H, seed=5)
    job = {
        "name": "pv",
        "inputs": [video],
        "model": {"name": "keyer"},
        "window": {"frames": 12, "overlap": 4},
        "output": {"uri": str(d / "out/{stem}_{channel}.{ext}"), "channels": ["alpha", "comp"], "format": "mp4"},
    }
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    result = run_job(parse_spec(yaml.safe_dump(job), "job.yaml"))
    assert result.ok, result.manifest
    return d, video, result


def cell(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return np.asarray(img)[y : y + h, x : x + w]


def test_sheet_from_manifest(keyed, tmp_path):
    d, video, result = keyed
    sheets, left_out = preview_job(result.manifest_url, str(tmp_path / "sheet.png"), frames=3, width=W)
    assert left_out == [] and len(sheets) == 1
    sheet = sheets[0]
    img = Image.open(sheet.path)
    assert img.size == sheet.size == (GUTTER + 3 * (W + PAD) + PAD, 2 * HEADER + 3 * (H + PAD) + PAD)
    assert sheet.frames == [0, 12, 23]
    alpha_url = next(iter(result.manifest["videos"].values()))["outputs"]["alpha"]["url"]
    for r, i in enumerate(sheet.frames):
        a = next(read_frames(alpha_url, i, i + 1))[..., 0]  # [H, W] decoded alpha of frame i
        got = cell(img, sheet.cells[(r, "alpha")])
        assert np.array_equal(got, np.repeat(a[..., None], 3, axis=-1)), f"alpha cell of frame {i}"
        assert np.array_equal(cell(img, sheet.cells[(r, "input")]), next(read_frames(video, i, i + 1)))
        comp = cell(img, sheet.cells[(r, "composite")]).astype(int)
        src = next(read_frames(video, i, i + 1)).astype(int)
        opaque, clear = a == 255, a == 0
        assert opaque.any() and clear.any()
        assert np.abs(comp - src)[opaque].max() <= 1  # the subject is kept
        assert np.abs(comp - src)[clear].mean() > 20  # the screen is replaced by the checkerboard


def test_sheet_through_job_yaml_cli(keyed, tmp_path):
    d, _, _ = keyed
    res = CliRunner().invoke(main, ["preview", str(d / "job.yaml"), "-o", str(tmp_path), "--frames", "2",
                                    "--width", "48", "--background", "0,0,1"])
    assert res.exit_code == 0, res.output
    (png,) = tmp_path.glob("clip-*_preview.png")
    assert Image.open(png).size == (GUTTER + 3 * (48 + PAD) + PAD, 2 * HEADER + 2 * (32 + PAD) + PAD)


def test_png_sequence_alpha(keyed, tmp_path):
    """A PNG-sequence alpha (what format: png writes) is read frame by frame."""
    _, video, _ = keyed
    seq = tmp_path / "alpha"
    seq.mkdir()
    rng = np.random.default_rng(0)
    alphas = rng.integers(0, 256, (T, H, W), dtype=np.uint8)
    for i, a in enumerate(alphas):
        Image.fromarray(a).save(seq / f"{i:06d}.png")
    sheet = contact_sheet(video, str(seq), str(tmp_path / "s.png"), frames=4, width=W)
    img = Image.open(sheet.path)
    for r, i in enumerate(sheet.frames):
        assert np.array_equal(cell(img, sheet.cells[(r, "alpha")])[..., 0], alphas[i])


def test_unsubmitted_job_is_one_line_error(tmp_path):
    job = {"name": "never", "inputs": ["x.mp4"], "output": {"uri": str(tmp_path / "{stem}.{ext}")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(PreviewError, match=r"manifest.json: no manifest \(has the job been submitted\?\)"):
        preview_job(str(tmp_path / "job.yaml"))
    res = CliRunner().invoke(main, ["preview", str(tmp_path / "job.yaml")])
    assert res.exit_code == 1 and "no manifest" in res.output
