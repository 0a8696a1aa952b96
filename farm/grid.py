"""The chunk grid a shard is rendered on, and where a checkpoint may cut it.

A shard runs its model in chunks (bounded memory; the state is captured where it is handed off). A
checkpointed shard (``farm.drain``: its node is being drained) stops at a chunk boundary inside its core,
and the attempt that continues it renders the rest on the same grid, so the model makes the calls an
uninterrupted render makes. Pure: no Ray, no I/O.
"""

from __future__ import annotations

import itertools
from typing import Any

from farm.plan import Shard


def stops_at(task: Any, b: int) -> bool:
    """Whether an attempt asked to checkpoint stops after the chunk that ends at frame ``b``: inside the core
    only (its heads are complete, its tail not begun), rendering in chunks, before its state is handed off."""
    s = task.shard
    return (task.chunk is not None and task.passes == 1 and s.core_start < b < s.core_stop
            and (task.handoff_at is None or b < task.handoff_at))


def render_ranges(run_start: int, s: Shard, handoff_at: int | None, chunk: int | None,
                  resume_from: int | None = None) -> list[tuple[int, int]]:
    """Half-open ranges the shard is rendered in: cut where the preroll ends, where the state is
    handed off, and every ``chunk`` frames (bounded memory for per-frame and recurrent models). A
    continuation from ``resume_from`` keeps the same grid from there, so its calls are the ones an
    uninterrupted render makes (a recurrent model's output is then the same, bit for bit)."""
    cuts = {run_start, s.start, s.stop}
    if handoff_at is not None and run_start < handoff_at < s.stop:
        cuts.add(handoff_at)
    if chunk:
        cuts.update(range(run_start, s.stop, chunk))
    edges = sorted(c for c in cuts if run_start <= c <= s.stop)
    if resume_from is not None:
        if resume_from not in edges[:-1]:
            raise ValueError(f"{s.name}: cannot resume from frame {resume_from}, not a chunk boundary of the shard")
        edges = edges[edges.index(resume_from):]
    return list(itertools.pairwise(edges))
