"""What the scheduler answers (``Scheduler.decide``): commands the driver carries out in order through
the actor pool, and the scheduler's configuration. Plain data, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farm.events import EventKind
from farm.graph import Unit

# ---- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """Run an actor unit (prepare, render, refine) on ``slot``."""

    attempt: int
    slot: int
    video: str
    unit: Unit
    number: int  # the unit's attempt number (a copy shares its original's)
    copy: bool = False
    tag: str = ""  # suffix of a copy's part names: it never overwrites the original's


@dataclass(frozen=True)
class Launch:
    """Run a task unit (blend, commit) anywhere."""

    attempt: int
    video: str
    unit: Unit


@dataclass(frozen=True)
class Prefetch:
    """Tell ``slot`` the unit it most likely runs next, so it decodes its first chunks meanwhile (in a handoff
    chain: before the state arrives). A hint: a wrong guess costs one decode."""

    slot: int
    video: str
    unit: Unit


@dataclass(frozen=True)
class Cancel:
    """Stop the losing copy ``attempt`` on ``slot``; it stays in flight until it has stopped."""

    attempt: int
    slot: int
    video: str
    shard: int


@dataclass(frozen=True)
class Checkpoint:
    """Ask ``attempt`` (a handoff chain's shard on a draining node) to stop at its next chunk boundary inside
    its core and save its state there; it then returns a partial record (``Scheduler.on_checkpointed``)."""

    attempt: int
    slot: int
    video: str
    shard: int


@dataclass(frozen=True)
class Ping:
    slot: int
    generation: int


@dataclass(frozen=True)
class Kill:
    slot: int


@dataclass(frozen=True)
class Replace:
    """Start a successor in ``slot``, off the blocklisted and the draining nodes."""

    slot: int
    generation: int
    avoid_nodes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FailVideo:
    video: str
    message: str


@dataclass(frozen=True)
class FinishVideo:
    video: str


@dataclass(frozen=True)
class Emit:
    kind: EventKind
    data: dict[str, Any]


Command = Dispatch | Launch | Prefetch | Cancel | Checkpoint | Ping | Kill | Replace | FailVideo | FinishVideo | Emit


@dataclass(frozen=True)
class Config:
    retries: int = 2
    speculative: bool = True  # False for handoff chains and when the spec turns it off
    heartbeat_s: float | None = 30.0
    stall_s: float = 300.0
    blocklist_after: int = 3
    max_failed_shards: int | None = None
    prefetch: bool = False  # hint each actor its likely next shard (chunked models: decode runs ahead)
    preemption: str = "drain"  # a draining node's notice: "drain" (farm.drain) or "ignore"
    drain_min_deadline_s: float = 10.0  # under this much notice a shard in flight is not left to finish in place
    handoff: bool = False  # shards hand state down a chain (never copied)
    queue: int = 1  # shards an actor holds at once: with 2 the next one's model calls follow the current one's
