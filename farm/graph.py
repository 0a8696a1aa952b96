"""The work of one video as data: which units there are and what each one needs first.

Pure (no Ray, no I/O): ``build_graph`` turns a video's shards into units, ``farm plan`` prints them and
the scheduler runs them, so what a dry run shows and what a run does can never disagree.

A unit is one of:

- ``prepare``: the model's per-video conditioning (``VideoModel.prepare``), on an actor;
- ``render``: one shard of pass 1, on an actor (handoff chains: after the previous shard, from its state);
- ``refine``: one shard of pass 2 of a two-pass model, after pass 1 of itself and its neighbours and
  after the previous refine, whose state it continues (a DAG, not a barrier between the passes);
- ``blend``: one channel's overlap of two adjacent shards of the last pass, a small task;
- ``commit``: one channel's output, joined from its pieces once every core and blend is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from farm.plan import PlanError, Shard, plan_shards, refine_shards


class Kind(str, Enum):
    PREPARE = "prepare"
    RENDER = "render"
    REFINE = "refine"
    BLEND = "blend"
    COMMIT = "commit"


ACTOR_KINDS = (Kind.PREPARE, Kind.RENDER, Kind.REFINE)  # run on a model actor; the others are tasks


@dataclass(frozen=True)
class Unit:
    id: str  # unique in its video: "prepare", "shard-0003", "refine-0003", "blend-0003-alpha", "commit-alpha"
    kind: Kind
    needs: tuple[str, ...] = ()  # units that must be done first
    state_from: str | None = None  # the unit whose handed-off state this one starts from
    frames: tuple[int, int] | None = None  # the half-open frame range it renders or writes
    shard: int | None = None  # render/refine: position in the video's shard list (the ledger's index)
    channel: str | None = None  # blend/commit: the output channel

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["needs"], d["frames"] = list(self.needs), list(self.frames) if self.frames else None
        return d


def video_shards(video: str, frame_count: int, frames: int, overlap: int, preroll: int, passes: int) -> list[Shard]:
    """Every shard of a video: pass 1's windows, then (two-pass models) pass 2's at positions n..2n-1."""
    shards = plan_shards(video, frame_count, frames, overlap, preroll)
    return shards + refine_shards(shards) if passes == 2 else shards


def build_graph(video: str, shards: list[Shard], mode: str, passes: int, channels: list[str]) -> list[Unit]:
    """The units of ``video`` in a fixed order (prepare, pass 1, pass 2, blends, commits).

    ``shards`` is ``video_shards``'s list; ``mode`` the window's state mode (``handoff`` chains pass 1);
    ``passes`` 1 or 2; ``channels`` the output channels (one blend per overlap and one commit each)."""
    if passes not in (1, 2):
        raise PlanError(f"{video}: a model has 1 or 2 passes, not {passes}")
    n = len(shards) // passes  # shards per pass
    if not shards or n * passes != len(shards):
        raise PlanError(f"{video}: {len(shards)} shards do not make {passes} equal passes")
    units = [Unit("prepare", Kind.PREPARE)]
    first, last = shards[:n], shards[-n:]
    for s in first:
        prev = first[s.index - 1].name if mode == "handoff" and s.index > 0 else None
        needs = ("prepare",) + ((prev,) if prev else ())
        units.append(Unit(s.name, Kind.RENDER, needs, prev, (s.start, s.stop), s.index))
    if passes == 2:
        for k, s in enumerate(shards[n:]):
            prev = shards[n + k - 1].name if k > 0 else None
            pass1 = tuple(first[j].name for j in range(max(k - 1, 0), min(k + 2, n)))
            needs = ("prepare", *pass1) + ((prev,) if prev else ())
            units.append(Unit(s.name, Kind.REFINE, needs, prev, (s.start, s.stop), n + k))
    for ch in channels:
        blends = []
        for a, b in zip(last, last[1:], strict=False):
            if a.stop > a.core_stop:  # an overlap: written by its own small task once both sides are done
                blends.append(Unit(f"blend-{a.index:04d}-{ch}", Kind.BLEND, (a.name, b.name), None,
                                   (a.core_stop, a.stop), a.index, ch))
        units += blends
        needs = tuple(s.name for s in last) + tuple(u.id for u in blends)
        units.append(Unit(f"commit-{ch}", Kind.COMMIT, needs, None, (0, last[-1].stop), None, ch))
    return units


def check_limits(url: str, frame_count: int, width: int, height: int, max_frames: int | None,
                 max_pixels: int | None) -> str | None:
    """Why a probed video is refused by the job's ``limits`` (one line naming the input), or None."""
    if max_frames is not None and frame_count > max_frames:
        return f"{url}: {frame_count} frames, over limits.max_frames={max_frames}"
    if max_pixels is not None and width * height > max_pixels:
        return f"{url}: {width}x{height} pixels, over limits.max_pixels={max_pixels}"
    return None
