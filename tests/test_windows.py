"""Edge windows render every frame exactly once, end to end (the planner's property test, on real renders).

Short windows with the largest overlap the spec accepts, over videos shorter than, equal to and longer
than a window: each output holds exactly the input's frame count, and frame k is the synthetic model's
render of input frame k (it inverts the frames, so a lost, doubled or shifted frame shows).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from farm.driver import run_job
from farm.plan import plan_shards
from farm.report import count_frames_done, ledger_status
from farm.sample import write_sample
from farm.spec import parse_spec
from farm.video import read_frames

LENGTHS = (1, 5, 9, 17)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[int, str]:
    d = tmp_path_factory.mktemp("windows")
    return {n: write_sample(str(d / f"len{n}.mp4"), frames=n, width=32, height=24, seed=n)[0] for n in LENGTHS}


@pytest.mark.parametrize("frames, overlap", [(3, 1), (9, 4), (2, 0)])
def test_edge_windows_render_every_frame_once(ray_session, clips, tmp_path, frames, overlap) -> None:
    job = {
        "name": "windows",
        "inputs": list(clips.values()),
        "model": {"name": "synthetic"},
        "window": {"frames": frames, "overlap": overlap},
        "output": {"uri": str(tmp_path / "{stem}_{channel}"), "format": "png", "channels": ["fgr"]},
        "resources": {"actors": 2},
        "retries": 0,
    }
    spec = parse_spec(yaml.safe_dump(job), "windows.yaml")
    result = run_job(spec)
    assert result.ok, result.manifest
    status = ledger_status(spec)  # what `farm status` prints: a finished video reads N/N
    assert sorted((v["frames_done"], v["frames"]) for v in status["videos"].values()) == [(n, n) for n in LENGTHS]
    for n, url in clips.items():
        src = np.stack(list(read_frames(url, 0, n)))
        pngs = sorted((tmp_path / f"len{n}_fgr").glob("*.png"))
        assert len(pngs) == n, (frames, overlap, n, [p.name for p in pngs])
        out = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
        diff = np.abs(out.astype(int) - (255 - src.astype(int)))
        assert diff.max() <= 1, (frames, overlap, n, np.unique(np.nonzero(diff > 1)[0]))


def test_status_counts_core_frames_and_blended_overlaps_and_only_grows() -> None:
    """The quickstart's window (96 frames, 24/8): finishing the shards in any order, the count never
    drops, overlaps count once both their shards are done, and all six shards done read 96/96."""
    shards = [s.to_dict() for s in plan_shards("v", 96, 24, 8)]
    assert len(shards) == 6
    rng = np.random.default_rng(0)
    for _ in range(20):
        done: set[int] = set()
        seen = [0]
        for i in rng.permutation(len(shards)):
            done.add(int(i))
            seen.append(count_frames_done(shards, done))
        assert seen == sorted(seen) and seen[-1] == 96, seen
    assert count_frames_done(shards, {0}) == 16 and count_frames_done(shards, {0, 1}) == 16 + 8 + 8
    assert count_frames_done(shards, set(), finished=True) == 96
