"""``comp`` over a background image or video (a clean plate), through ``farm submit`` on a real local Ray.

The synthetic model's outputs are known exactly (fgr = 1 - rgb, alpha = mean of fgr), so the composite
of every frame can be computed here from the decoded input and the decoded background and compared
with PNG outputs, shard seams included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from farm.driver import run_job
from farm.sample import write_sample
from farm.spec import parse_spec
from farm.video import probe, read_frames

FRAMES, W, H = 20, 64, 48


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("comp")
    clip, _ = write_sample(str(d / "clip.mp4"), frames=FRAMES, width=W, height=H, seed=11, audio=False)
    plate, _ = write_sample(str(d / "plate.mp4"), frames=8, width=W, height=H, seed=12, audio=False)  # loops
    rng = np.random.default_rng(0)
    image = str(d / "plate.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)  # another size: resized
    return {"clip": clip, "plate": plate, "image": image}


def decode(url: str) -> np.ndarray:
    return np.stack(list(read_frames(url, 0, probe(url).frame_count)))


def expected_comp(clip: str, background: np.ndarray) -> np.ndarray:
    """The composite the synthetic model's fgr/alpha give over ``background`` (float [T|1, H, W, 3])."""
    fgr = 1.0 - decode(clip).astype(np.float32) / 255.0
    alpha = fgr.mean(axis=-1, keepdims=True)
    comp = fgr * alpha + background * (1.0 - alpha)
    return np.clip(np.rint(comp * 255.0), 0, 255).astype(np.uint8)


def render(media: dict[str, str], out: Path, background) -> dict:
    job = {
        "name": "comp",
        "inputs": [media["clip"]],
        "model": {"name": "synthetic"},
        "window": {"frames": 8, "overlap": 2},  # 3 shards: the plate's frames must follow each shard's start
        "output": {"uri": str(out / "{stem}_{channel}"), "channels": ["comp"], "format": "png",
                   "background": background},
        "resources": {"actors": 2},
    }
    result = run_job(parse_spec(yaml.safe_dump(job), "comp.yaml"))
    (entry,) = result.manifest["videos"].values()
    return entry


def png_frames(folder: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))])


def test_comp_over_a_looping_background_video(ray_session, media, tmp_path):
    entry = render(media, tmp_path, media["plate"])
    assert entry["status"] == "succeeded", entry
    got = png_frames(entry["outputs"]["comp"]["url"])
    plate = decode(media["plate"]).astype(np.float32) / 255.0
    background = plate[np.arange(FRAMES) % len(plate)]  # 8 plate frames under 20 input frames: it loops
    want = expected_comp(media["clip"], background)
    assert got.shape == want.shape == (FRAMES, H, W, 3)
    # Overlaps are blended in float16 and rounded again: one level at most.
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # A plate frame off by one would be far off: the check above can tell.
    shifted = expected_comp(media["clip"], plate[(np.arange(FRAMES) + 1) % len(plate)])
    assert np.abs(got.astype(int) - shifted.astype(int)).max() > 8


def test_comp_over_an_image_resized_to_the_frame(ray_session, media, tmp_path):
    entry = render(media, tmp_path, media["image"])
    assert entry["status"] == "succeeded", entry
    img = Image.open(media["image"]).convert("RGB").resize((W, H), Image.Resampling.BILINEAR)
    want = expected_comp(media["clip"], np.asarray(img, dtype=np.float32)[None] / 255.0)
    got = png_frames(entry["outputs"]["comp"]["url"])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_unreadable_background_fails_the_video_with_one_line(ray_session, media, tmp_path):
    missing = str(tmp_path / "no_such_plate.mov")
    entry = render(media, tmp_path, missing)
    assert entry["status"] == "failed"
    assert "output.background" in entry["error"] and "no_such_plate.mov" in entry["error"]
    assert "\n" not in entry["error"]
