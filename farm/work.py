"""One video's work as the scheduler sees it: its units' states, the ready set (updated as units finish,
never recomputed), retries, avoid-sets and copies; and one attempt at a unit. Pure data, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from farm.graph import Kind, Unit


class UnitState(Enum):
    WAITING = "waiting"  # some of its needs are not done
    READY = "ready"
    RUNNING = "running"  # one attempt in flight, or two (a straggler's copy)
    DONE = "done"


@dataclass
class Attempt:
    id: int
    video: str
    unit: Unit
    slot: int | None
    number: int
    started: float  # dispatched, or (queued behind another attempt) when it got the actor's model
    generation: int = 0  # of the actor it was sent to: a successor's is another actor
    abandoned: bool = False  # a cancelled copy: only its actor still matters
    copy: bool = False  # a straggler's or a moved shard's copy: it spent none of the unit's attempts


class VideoWork:
    """One video's units, their states and the ready set, updated as units finish."""

    def __init__(self, key: str, units: list[Unit], frame_count: int, done: set[str], rank: int) -> None:
        self.key, self.rank, self.running = key, rank, True
        self.units = {u.id: u for u in units}
        self.state: dict[str, UnitState] = {}
        self.missing: dict[str, int] = {}
        self.dependents: dict[str, list[str]] = {u.id: [] for u in units}
        self.ready: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.avoid: dict[str, set[int]] = {}
        self.copies: dict[str, list[int]] = {}
        self.left = frame_count  # frames not yet rendered (both passes count): the priority
        todo_actor = any(u.kind in (Kind.RENDER, Kind.REFINE) and u.id not in done for u in units)
        if not todo_actor:
            done = done | {"prepare"}  # nothing left that needs the conditioning
        for u in units:
            for need in u.needs:
                self.dependents[need].append(u.id)
            if u.id in done:
                self.state[u.id] = UnitState.DONE
                self.left -= self.frames(u)
                continue
            self.missing[u.id] = sum(n not in done for n in u.needs)
            self.state[u.id] = UnitState.WAITING
            if not self.missing[u.id]:
                self.state[u.id] = UnitState.READY
                self.ready.add(u.id)

    @staticmethod
    def frames(u: Unit) -> int:
        return u.frames[1] - u.frames[0] if u.frames and u.kind in (Kind.RENDER, Kind.REFINE) else 0

    def complete(self, uid: str) -> None:
        self.state[uid] = UnitState.DONE
        self.ready.discard(uid)
        self.left -= self.frames(self.units[uid])
        for d in self.dependents[uid]:
            if d not in self.missing:  # done already (resumed)
                continue
            self.missing[d] -= 1
            if not self.missing[d] and self.state[d] == UnitState.WAITING:
                self.state[d] = UnitState.READY
                self.ready.add(d)

    def make_ready(self, uid: str) -> None:
        self.state[uid] = UnitState.READY
        self.ready.add(uid)

    def succeeded(self) -> bool:
        return all(s == UnitState.DONE for u, s in self.state.items() if self.units[u].kind == Kind.COMMIT)
