"""The planner over its edges: every frame covered, at most two shards per frame, pieces tile the video."""

import pytest

from farm.plan import PlanError, output_pieces, plan_shards


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
@pytest.mark.parametrize("frames,overlap", [(24, 8), (24, 0), (10, 5), (1, 0), (85, 16)])
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
        ((24, 24), "smaller than window.frames"),
        ((8, 16), "smaller than window.frames"),
        ((24, 13), "at most half"),
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
