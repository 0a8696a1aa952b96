"""Seam quality: before two shards' renders of the same frames are blended, the blend task measures how
far they disagree (mean absolute difference per channel, in 1/255, and the worst frame). A stateless model
disagrees by 0; a model whose every other shard is shifted by k levels disagrees by k at every seam."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from farm.report import ledger_status, read_report
from farm.stitch import seam_disagreement, seam_summary, worst_seam


def test_equal_renders_disagree_by_zero():
    x = np.random.default_rng(0).random((6, 4, 5, 3)).astype(np.float16)
    m = seam_disagreement(x, x.copy(), start=40)
    assert m == {"start": 40, "frames": 6, "mean": 0.0, "per_channel": [0.0, 0.0, 0.0], "worst_frame": 40,
                 "worst": 0.0}


def test_offset_is_measured_per_channel_with_its_worst_frame():
    tail = np.full((5, 4, 4, 3), 0.25, np.float32)
    head = tail.copy()
    head[..., 0] += 6 / 255  # every frame, red only: per channel (6, 0, 0), mean 2
    head[3, :2, :, 2] += 20 / 255  # half of frame 3's blue by 20 levels: that frame's worst channel is 10
    m = seam_disagreement(tail, head, start=100)
    assert m["per_channel"] == pytest.approx([6, 0, 2], abs=1e-3)
    assert m["mean"] == pytest.approx(8 / 3, abs=1e-3)
    assert (m["worst_frame"], m["worst"]) == (103, pytest.approx(10, abs=1e-3))


def test_summary_and_worst_seam():
    seams = [{"output": "alpha", "start": 12, "frames": 4, "mean": 1.0, "worst_frame": 13, "worst": 3.0},
             {"output": "alpha", "start": 24, "frames": 12, "mean": 3.0, "worst_frame": 30, "worst": 5.0}]
    assert seam_summary(seams) == {"max": 5.0, "mean": 2.5}  # frame-weighted: (4*1 + 12*3) / 16
    assert worst_seam(seams)["start"] == 24
    assert seam_summary([]) == {"max": 0.0, "mean": 0.0} and worst_seam([]) is None  # nothing rendered twice


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ"):
        seam_disagreement(np.zeros((2, 2, 2, 1)), np.zeros((3, 2, 2, 1)))


def run(tmp_path, name, model, window, frames=40):
    from farm.driver import run_job
    from farm.sample import write_sample
    from farm.spec import parse_spec

    write_sample(str(tmp_path / f"{name}.mp4"), frames=frames, width=64, height=48)
    job = {"name": name, "inputs": [str(tmp_path / f"{name}.mp4")], "model": model, "window": window,
           "output": {"uri": str(tmp_path / "out/{stem}_{channel}.{ext}"), "channels": ["alpha", "fgr"]},
           "resources": {"actors": 2}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
    spec = parse_spec(yaml.safe_dump(job), f"{name}.yaml")
    result = run_job(spec)
    assert result.ok, result.manifest
    (video,) = result.manifest["videos"].values()
    (row,) = read_report(result.report_url)
    return spec, video, row


def test_stateless_keyer_seams_are_zero(tmp_path, ray_session):
    """40 frames, windows of 16 overlapping by 4: shards at 0, 12, 24 -> 2 seams x 2 outputs, all ~0."""
    spec, video, row = run(tmp_path, "keyed", {"name": "keyer", "params": {"key": "green"}},
                           {"frames": 16, "overlap": 4})
    assert sorted((s["start"], s["output"]) for s in video["seams"]) == [
        (12, "alpha"), (12, "fgr"), (24, "alpha"), (24, "fgr")]
    assert all(s["frames"] == 4 and s["worst"] < 0.01 for s in video["seams"]), video["seams"]
    assert row["seam_disagreement_max"] < 0.01 and row["seam_disagreement_mean"] < 0.01
    status = ledger_status(spec)
    (v,) = status["videos"].values()
    assert v["worst_seam"]["worst"] < 0.01 and v["seam_disagreement_max"] < 0.01


def test_shifted_shards_report_their_offset(tmp_path, ray_session):
    """Every other shard moved by 8 levels: every seam disagrees by 8 on every frame and channel."""
    from farm.cli import main

    model = {"name": "synthetic", "params": {"shard_offset": 8, "shard_stride": 12}}
    spec, video, row = run(tmp_path, "shifted", model, {"frames": 16, "overlap": 4})
    assert len(video["seams"]) == 4
    for s in video["seams"]:
        assert s["mean"] == pytest.approx(8, abs=0.2) and s["worst"] == pytest.approx(8, abs=0.2), s
        assert s["per_channel"] == pytest.approx([8] * len(s["per_channel"]), abs=0.2)
        assert s["start"] <= s["worst_frame"] < s["start"] + s["frames"]
    assert row["seam_disagreement_max"] == pytest.approx(8, abs=0.2)
    assert row["seam_disagreement_mean"] == pytest.approx(8, abs=0.2)
    out = CliRunner().invoke(main, ["status", str(tmp_path / "shifted.yaml")])
    assert out.exit_code == 0, out.output
    assert ", worst seam 8." in out.output or ", worst seam 7.9" in out.output, out.output
    assert "shards 3/3, frames 40/40," in out.output  # overlap frames count as done once both shards are


def test_handoff_chain_has_no_seam(tmp_path, ray_session):
    """A handoff chain renders no frame twice: no seams, and the report says 0."""
    model = {"name": "synthetic", "params": {"shard_offset": 8, "shard_stride": 12}}
    spec, video, row = run(tmp_path, "chained", model, {"frames": 12, "state": "handoff"})
    assert video["shards"] > 1 and video["seams"] == []
    assert (row["seam_disagreement_max"], row["seam_disagreement_mean"]) == (0.0, 0.0)
