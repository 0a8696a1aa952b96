"""The planner over its edges: every frame covered, at most two shards per frame, pieces tile the video."""

import numpy as np
import pydantic
import pytest

from farm.plan import PlanError, output_pieces, plan_shards
from farm.spec import WindowSpec
from farm.stitch import blend


def coverage(shards, n):
    counts = [0] * n
    for s in shards:
        for f in range(s.start, s.stop):
            counts[f] += 1
    return counts


def check_invariants(shards, n, overlap):
    assert shards[0].start == 0 and shards[-1].stop == n
    assert all(1 <= c <= 2 for c in coverage(shards, n))
    for a, b in zip(shards, shards[1:], strict=False):
        assert a.stop - b.start == overlap  # exactly `overlap` frames shared
        assert a.core_stop == b.start and b.core_start == a.stop
    pieces = output_pieces(shards)
    pos = 0
    for _, _, start, stop in pieces:
        assert start == pos and stop > start
        pos = stop
    assert pos == n


@pytest.mark.parametrize("n", [1, 2, 7, 23, 24, 25, 40, 41, 48, 100, 1000])
@pytest.mark.parametrize("frames,overlap", [(24, 8), (24, 0), (10, 4), (9, 4), (1, 0), (85, 16)])
def test_tiling_invariants(n, frames, overlap):
    check_invariants(plan_shards("v", n, frames, overlap), n, overlap)


def test_shorter_than_one_window_is_one_shard():
    (s,) = plan_shards("v", 10, 24, 8)
    assert (s.start, s.stop, s.core_start, s.core_stop) == (0, 10, 0, 10)


def test_one_frame_video():
    (s,) = plan_shards("v", 1, 24, 8)
    assert (s.start, s.stop) == (0, 1) and s.frames == 1


def test_exact_multiple_without_overlap():
    shards = plan_shards("v", 96, 24, 0)
    assert [(s.start, s.stop) for s in shards] == [(0, 24), (24, 48), (48, 72), (72, 96)]
    assert all(s.core_start == s.start and s.core_stop == s.stop for s in shards)


def test_exact_multiple_with_overlap_has_no_empty_last_shard():
    shards = plan_shards("v", 40, 24, 8)  # [0,24) [16,40): the second ends exactly at the end
    assert [(s.start, s.stop) for s in shards] == [(0, 24), (16, 40)]


def test_short_last_shard():
    shards = plan_shards("v", 50, 24, 8)
    assert [(s.start, s.stop) for s in shards] == [(0, 24), (16, 40), (32, 50)]
    assert (shards[-1].core_start, shards[-1].core_stop) == (40, 50)
    assert output_pieces(shards) == [
        ("core", 0, 0, 16),
        ("blend", 0, 16, 24),
        ("core", 1, 24, 32),
        ("blend", 1, 32, 40),
        ("core", 2, 40, 50),
    ]


def test_preroll_is_clamped_at_frame_zero():
    shards = plan_shards("v", 100, 30, 0, preroll=8)
    assert [s.preroll for s in shards] == [0, 8, 8, 8]
    shards = plan_shards("v", 100, 5, 0, preroll=8)
    assert shards[1].preroll == 5  # only 5 frames exist before frame 5


@pytest.mark.parametrize(
    "args,message",
    [
        ((24, 24), "less than half of window.frames"),
        ((8, 16), "less than half of window.frames"),
        ((24, 13), "less than half"),
        ((24, 12), "less than half"),  # the middle shards would have no frame of their own
        ((8, 4), "no frame of its own"),
        ((0, 0), "at least 1"),
        ((24, -1), "not be negative"),
    ],
)
def test_bad_windows_rejected(args, message):
    with pytest.raises(PlanError, match=message):
        plan_shards("v", 100, *args)


def test_empty_video_rejected():
    with pytest.raises(PlanError, match="no frames"):
        plan_shards("v", 0, 24, 8)


def _accepted(frames: int, overlap: int) -> bool:
    try:
        WindowSpec(frames=frames, overlap=overlap)
    except pydantic.ValidationError:
        return False
    return True


def test_every_window_the_spec_accepts_renders_every_frame_exactly_once():
    """All small (frames, overlap, length): the planner tiles the video and the assembly (each shard's
    core, each overlap blended from the two shards that rendered it, joined in order) gives frame k at
    position k, once. A window the spec refuses is refused by the planner too."""
    accepted = 0
    for frames in range(1, 13):
        for overlap in range(0, frames + 1):
            if not _accepted(frames, overlap):
                with pytest.raises(PlanError):
                    plan_shards("v", 40, frames, overlap)
                continue
            for n in range(1, 41):
                accepted += 1
                shards = plan_shards("v", n, frames, overlap)
                check_invariants(shards, n, overlap)
                # each shard "renders" the frame index of every frame it covers
                rendered = {s.index: np.arange(s.start, s.stop, dtype=np.float32) for s in shards}
                out = []
                for kind, i, start, stop in output_pieces(shards):
                    s = shards[i]
                    mine = rendered[i][start - s.start : stop - s.start]
                    if kind == "blend":
                        nxt = shards[i + 1]
                        theirs = rendered[i + 1][start - nxt.start : stop - nxt.start]
                        mine = blend(mine[:, None, None, None], theirs[:, None, None, None])[:, 0, 0, 0]
                    out.append(mine)
                joined = np.concatenate(out)  # blends of equal values, exact up to float rounding
                assert joined.shape == (n,) and np.abs(joined - np.arange(n)).max() < 1e-3, (frames, overlap, n)
    assert accepted == 1680  # (frames, overlap) pairs the spec accepts for frames <= 12, times 40 lengths
