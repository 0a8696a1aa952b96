"""farm.sample: the synthetic chroma-key clip and its ground-truth alpha."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from farm.sample import KEY_RGB, read_alpha_truth, write_sample
from farm.video import probe, read_frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("sample")
    return write_sample(str(d / "clip.mp4"), frames=24, width=160, height=120, fps=Fraction(24), seed=3)


def test_file_shape_count_fps(clip: tuple[str, str]) -> None:
    video, alpha = clip
    assert alpha.endswith("clip.alpha.npz")
    info = probe(video)
    assert (info.frame_count, info.width, info.height, info.fps) == (24, 160, 120, Fraction(24))
    assert info.has_audio and info.audio_codec == "aac"
    truth = read_alpha_truth(alpha)
    assert truth.shape == (24, 120, 160) and truth.dtype == np.uint8
    assert np.array_equal(read_alpha_truth(video), truth)


def test_truth_is_soft_and_moves(clip: tuple[str, str]) -> None:
    truth = read_alpha_truth(clip[1])
    assert ((truth > 0) & (truth < 255)).any()  # feathered edges
    assert (truth == 255).any() and (truth == 0).any()
    assert np.abs(truth[0].astype(int) - truth[12]).mean() > 1.0  # the figure moves


def test_screen_is_near_key_colour(clip: tuple[str, str]) -> None:
    truth = read_alpha_truth(clip[1])
    frames = np.stack(list(read_frames(clip[0], 0, 24)))  # [T, H, W, 3]
    # away from the edge (chroma subsampling smears 1-2 px): the clear screen is near the key colour
    clear = truth == 0
    for _ in range(3):
        clear[:, 1:-1, 1:-1] &= (
            clear[:, :-2, 1:-1] & clear[:, 2:, 1:-1] & clear[:, 1:-1, :-2] & clear[:, 1:-1, 2:]
        )
    err = np.abs(frames[clear].astype(int) - np.asarray(KEY_RGB["green"]))
    assert np.percentile(err, 99) < 25 and err.mean() < 8
    # and the opaque figure is far from it
    fg = frames[truth == 255].astype(int)
    assert np.abs(fg - np.asarray(KEY_RGB["green"])).sum(axis=-1).mean() > 150


def test_deterministic_and_blue(tmp_path: Path) -> None:
    a = write_sample(str(tmp_path / "a.mp4"), frames=4, width=64, height=48, seed=1, key="blue", audio=False)
    b = write_sample(str(tmp_path / "b.mp4"), frames=4, width=64, height=48, seed=1, key="blue", audio=False)
    assert Path(a[0]).read_bytes() == Path(b[0]).read_bytes()
    assert np.array_equal(read_alpha_truth(a[1]), read_alpha_truth(b[1]))
    assert not probe(a[0]).has_audio
    px = next(read_frames(a[0], 0, 1))[2, 2]
    assert px[2] > px[1] > px[0] - 20 and px[2] > 150
