"""Two-pass models on a real local Ray: pass 2 of a shard runs after pass 1 of it and its neighbours (a
DAG, not a barrier), sees pass 1's output blended across the overlaps, and hands its state down the chain.

The ``synthetic-2pass`` model makes each of these checkable: its pass 2 keeps pass 1's ``fgr`` and
writes a per-shard "noise" as ``alpha``, which only the handed-off state makes agree across a seam.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from farm.driver import JobRunner, absolute_local_paths
from farm.sample import write_sample
from farm.spec import parse_spec
from farm.video import read_frames

FRAMES, WINDOW, OVERLAP = 40, 12, 4  # shards [0,12) [8,20) [16,28) [24,36) [32,40)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("passes")
    video, _ = write_sample(str(d / "clip.mp4"), frames=FRAMES, width=32, height=24, seed=8, audio=False)
    return video


def run(clip: str, out: Path, actors: int = 3):
    job = {
        "name": "passes",
        "inputs": [clip],
        "model": {"name": "synthetic-2pass", "params": {"sleep_per_frame": 0.002}},
        "window": {"frames": WINDOW, "overlap": OVERLAP},
        "output": {"uri": str(out / "{stem}_{channel}"), "channels": ["alpha", "fgr"], "format": "png"},
        "resources": {"actors": actors},
    }
    runner = JobRunner(absolute_local_paths(parse_spec(yaml.safe_dump(job), "passes.yaml")))
    result = runner.run()
    (entry,) = result.manifest["videos"].values()
    return entry, runner.events


def pngs(folder: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))]).astype(int)


def test_pass_two_follows_its_neighbours_and_hands_its_state_down(ray_session, clip, tmp_path):
    entry, events = run(clip, tmp_path)
    assert entry["status"] == "succeeded", entry
    order = [e["shard"] for e in events if e["event"] == "shard_done"]
    n = len(order) // 2
    assert n == 5 and sorted(order) == list(range(2 * n))
    # DAG: refine-k (position n+k) finishes only after pass 1 of k-1, k, k+1 and refine-(k-1).
    for k in range(n):
        after = order.index(n + k)
        for need in [j for j in (k - 1, k, k + 1) if 0 <= j < n] + ([n + k - 1] if k else []):
            assert order.index(need) < after, (k, need, order)

    # fgr: pass 1 stitched then kept by pass 2 = the inverted input (rounding: pass 1 is kept as uint8).
    src = np.stack(list(read_frames(clip, 0, FRAMES))).astype(int)
    fgr = pngs(entry["outputs"]["fgr"]["url"])
    assert fgr.shape == src.shape and np.abs(fgr - (255 - src)).max() <= 1

    # alpha: the noise. Inside the overlaps both shards used the same values only through the state.
    alpha = pngs(entry["outputs"]["alpha"]["url"])
    alpha = alpha[..., 0] if alpha.ndim == 4 else alpha
    per_frame = alpha.reshape(FRAMES, -1)
    assert (per_frame == per_frame[:, :1]).all()  # one value per frame
    starts = [0, 8, 16, 24, 32]
    for k in range(1, n):
        for f in range(starts[k], starts[k] + OVERLAP):
            handed = np.rint(255 * np.modf(starts[k - 1] * 0.37 + (f - starts[k - 1]) * 0.11)[0])
            own = np.rint(255 * np.modf(starts[k] * 0.37 + (f - starts[k]) * 0.11)[0])  # without the state
            assert abs(per_frame[f, 0] - handed) <= 1, (k, f, per_frame[f, 0], handed)
            assert abs(handed - own) > 2  # the check above could tell a lost state
