"""Bad input is refused with one clear line naming it, and never takes the rest of the job down.

Most cases run as ONE batch job (one run_job, many inputs, good ones among them), then each video's
manifest entry is checked: the bad ones failed with ``<url>: <reason>`` on one line, the good and the
merely unusual ones (variable frame rate, rotation, odd size, 10-bit, 4:4:4) rendered every frame.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from media import corrupt_middle, truncate, write_audio_only, write_video

from farm.driver import JobError, run_job
from farm.spec import parse_spec

pytestmark = pytest.mark.timeout(300)  # a hang on bad input is a failure, not a stuck CI job


def synthetic_job(inputs: list[str], out: Path, **extra) -> dict:
    job = {
        "name": "bad-input",
        "inputs": inputs,
        "model": {"name": "synthetic"},
        "window": {"frames": 16},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": 2},
        "retries": 1,
    }
    job.update(extra)
    return job


def render(job: dict):
    return run_job(parse_spec(yaml.safe_dump(job), "test.yaml"))


def assert_clean_error(error: str | None, url: str, *reasons: str) -> None:
    assert error, f"{url}: no error recorded"
    assert "\n" not in error and "Traceback" not in error, error
    assert error.startswith(f"{url}: "), error  # names the input first
    assert any(r in error for r in reasons), (error, reasons)


def png_count(folder: Path) -> int:
    return len(list(folder.glob("*.png")))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("media")
    vfr_pts = [int(p) for p in np.cumsum([0] + [1, 1, 3, 1, 2] * 8)[:40]]  # gaps, as a phone camera drops frames
    files = {
        "good": write_video(d / "good.mp4", 40),
        "zero": str(d / "zero.mp4"),
        "truncated": truncate(write_video(d / "src_long.mp4", 60), d / "truncated.mp4"),
        "text": str(d / "text.mp4"),
        "audio": write_audio_only(d / "audio.mp4"),
        "corrupt": corrupt_middle(write_video(d / "src_c.mp4", 60, (128, 96)), d / "corrupt.mp4", at=0.3),
        "vfr": write_video(d / "vfr.mp4", 40, pts=vfr_pts),
        "rotated": write_video(d / "rotated.mp4", 20, rotation=90),
        "odd": write_video(d / "odd.mp4", 20, (65, 49), pix_fmt="yuv444p"),
        "10bit": write_video(d / "10bit.mp4", 20, pix_fmt="yuv420p10le"),
        "444": write_video(d / "444.mp4", 20, pix_fmt="yuv444p"),
        "long": write_video(d / "long.mp4", 90),
        "big": write_video(d / "big.mp4", 10, (192, 144)),
        "missing": str(d / "missing.mp4"),
        "scheme": "ftpx://host/clip.mp4",
    }
    Path(files["zero"]).write_bytes(b"")
    Path(files["text"]).write_text("this is not a video\n")
    return files


def test_batch_of_bad_inputs(ray_session, media, tmp_path) -> None:
    out = tmp_path / "out"
    job = synthetic_job(list(media.values()), out, limits={"max_frames": 80, "max_pixels": 128 * 96})
    result = render(job)
    videos = {v["url"]: v for v in result.manifest["videos"].values()}
    assert set(videos) == set(media.values())

    ok = {"good": 40, "vfr": 40, "rotated": 20, "odd": 20, "10bit": 20, "444": 20}
    for name, frames in ok.items():
        v = videos[media[name]]
        assert v["status"] == "succeeded", (name, v["error"])
        assert v["frames"] == frames
        assert png_count(Path(v["outputs"]["alpha"]["url"])) == frames, name  # no frame lost or doubled
    # the numbered bars survive: the synthetic model inverts, so frame i's bar b is dark where bit b is set
    from PIL import Image

    # the rotated clip (64x48 stored, display matrix 90) is rendered upright, as a player shows it
    rotated = sorted(Path(videos[media["rotated"]]["outputs"]["alpha"]["url"]).glob("*.png"))
    assert np.asarray(Image.open(rotated[0])).shape[:2] == (64, 48)

    first = np.asarray(Image.open(sorted(Path(videos[media["good"]]["outputs"]["alpha"]["url"]).glob("*.png"))[37]))
    bits = [first[:, b * 8 + 2 : (b + 1) * 8 - 2].mean() < 100 for b in range(8)]
    assert sum(int(x) << b for b, x in enumerate(bits)) == 37

    bad = {
        "zero": ("empty file",),
        "truncated": ("not a video file", "invalid data"),
        "text": ("not a video file",),
        "audio": ("no video stream",),
        "corrupt": ("cannot decode frame", "Invalid data"),
        "long": ("90 frames, over limits.max_frames=80",),
        "big": ("192x144 pixels, over limits.max_pixels=12288",),
        "missing": ("no such file",),
        "scheme": ("unsupported URL", "Protocol not known: ftpx"),
    }
    for name, reasons in bad.items():
        v = videos[media[name]]
        assert v["status"] == "failed", (name, v)
        assert_clean_error(v["error"], media[name], *reasons)
        assert not v["outputs"]
    assert not result.ok and set(result.failed) == {k for k, v in result.manifest["videos"].items()
                                                    if v["url"] in {media[n] for n in bad}}


def test_unreachable_bucket(ray_session, s3, media, tmp_path) -> None:
    """An input in a bucket that does not exist fails alone; the good input beside it renders."""
    missing = "s3://farm-no-such-bucket-7c1e/in/clip.mp4"
    job = synthetic_job([missing, media["good"]], tmp_path / "out", storage_options=s3.storage_options)
    result = render(job)
    videos = {v["url"]: v for v in result.manifest["videos"].values()}
    assert videos[media["good"]]["status"] == "succeeded"
    assert videos[missing]["status"] == "failed"
    assert_clean_error(videos[missing]["error"], missing, "no such file", "NoSuchBucket", "does not exist")
    assert s3.secret not in str(result.manifest)


def _rvm_job(weights: str, inputs: list[str], out: Path) -> dict:
    return {
        "name": "bad-weights",
        "inputs": inputs,
        "model": {"name": "rvm", "weights": weights, "device": "cpu"},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "retries": 0,
    }


def test_weights_with_wrong_sha256(ray_session, media, tmp_path) -> None:
    """The weights do not match their pinned checksum: the job stops before any render, on one line."""
    torch = pytest.importorskip("torch")
    w = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(2)}, w)
    ref = f"file://{w}#sha256={'0' * 64}"
    with pytest.raises(JobError) as err:
        render(_rvm_job(ref, [media["good"]], tmp_path / "out"))
    msg = str(err.value)
    assert "\n" not in msg and "sha256 mismatch" in msg and str(w) in msg, msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*_alpha"))


def test_trimap_of_the_wrong_size(ray_session, media, tmp_path) -> None:
    """FTP-VM with a trimap of another size than the video: that video fails at prepare, one line."""
    torch = pytest.importorskip("torch")
    from PIL import Image
    from safetensors.torch import save_file

    from actors.ftpvm_net import FTPVMNet

    torch.manual_seed(0)
    weights = tmp_path / "ftpvm.safetensors"
    save_file({k: v.contiguous() for k, v in FTPVMNet().state_dict().items()}, str(weights))
    trimap = tmp_path / "trimap.png"
    Image.fromarray(np.full((30, 40), 128, np.uint8)).save(trimap)
    job = {
        "name": "bad-trimap",
        "inputs": [media["good"]],
        "model": {"name": "ftpvm", "weights": str(weights), "device": "cpu", "params": {"trimap": str(trimap)}},
        "output": {"uri": str(tmp_path / "out/{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "retries": 0,
    }
    result = render(job)
    (v,) = result.manifest["videos"].values()
    assert v["status"] == "failed"
    assert v["error"] and "\n" not in v["error"] and "Traceback" not in v["error"]
    assert v["error"].startswith(media["good"] + ": ")
    assert "trimap" in v["error"] and "40x30" in v["error"] and "64x48" in v["error"], v["error"]


@pytest.mark.slow
def test_cli_reports_bad_input_on_one_line(media, tmp_path) -> None:
    """``farm submit``: exit code 1, one stderr line per failed input, never a traceback."""
    job = synthetic_job([media["zero"], media["text"], media["good"]], tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "submit", "--quiet", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("failed")]
    assert len(failed) == 2, proc.stderr
    assert any(media["zero"] in ln and "empty file" in ln for ln in failed)
    assert any(media["text"] in ln and "not a video file" in ln for ln in failed)
    assert f"succeeded {media['good']}" in proc.stdout


def test_output_prefix_that_cannot_be_written_is_one_line(ray_session, media, tmp_path) -> None:
    """An output under a regular file: the job stops before any render, naming output.uri and why."""
    (tmp_path / "afile").write_text("not a folder")
    job = synthetic_job([media["good"]], tmp_path / "afile" / "out")
    with pytest.raises(JobError) as e:
        render(job)
    assert str(e.value) == f"output.uri: cannot write under {tmp_path}/afile/out (Not a directory)"
