"""The run's events, typed, and the one log they go into.

The scheduler and the driver publish; the progress bar, metrics, the run report and the ledger's copy
(``events.json``, which ``farm status`` reads mid-run) subscribe. Pure: no Ray, no I/O here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger("farm")


class EventKind(str, Enum):
    START = "start"  # progress only: {"videos": {key: frames}, "job": id}
    FINISH = "finish"  # progress only: the manifest
    INPUT_ERROR = "input_error"
    RESUMED = "resumed"
    ACTOR_READY = "actor_ready"
    ACTOR_REFUSED = "actor_refused"
    ACTOR_REPLACED = "actor_replaced"
    ACTOR_RETIRED = "actor_retired"
    ACTOR_DIED = "actor_died"
    ACTOR_HUNG = "actor_hung"
    ACTOR_BLOCKLISTED = "actor_blocklisted"
    NODE_BLOCKLISTED = "node_blocklisted"
    NODE_DRAINING = "node_draining"  # a node is to be taken (preemption notice): farm.drain
    SHARD_MOVED = "shard_moved"  # a shard in flight on a draining node got a copy on a healthy actor
    SHARD_CHECKPOINTED = "shard_checkpointed"  # a chain's shard on a draining node stopped at frame k, saved its state
    SHARD_DISPATCHED = "shard_dispatched"
    SHARD_SPECULATED = "shard_speculated"
    SHARD_FAILED = "shard_failed"
    SHARD_CANCELLED = "shard_cancelled"
    SHARD_DONE = "shard_done"
    COPY_STOPPED = "copy_stopped"
    SEAM_MEASURED = "seam_measured"  # a blend measured how far two shards' renders of shared frames disagree
    VIDEO_FAILED = "video_failed"
    VIDEO_DONE = "video_done"


NOT_LOGGED = (EventKind.START, EventKind.FINISH)  # they frame the run; the log holds what happened in it
# events whose ``frames_lost`` are frames rendered again because a node was lost or drained
LOSS_KINDS = (EventKind.SHARD_FAILED, EventKind.SHARD_CANCELLED, EventKind.SHARD_CHECKPOINTED)
FAILURE_KINDS = (EventKind.SHARD_FAILED, EventKind.VIDEO_FAILED, EventKind.INPUT_ERROR, EventKind.ACTOR_RETIRED)


@dataclass(frozen=True)
class Event:
    kind: EventKind
    data: dict[str, Any]
    t: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """The logged form: ``{"t", "event", **data}`` (what ``events.json`` and the tests read)."""
        return {"t": self.t, "event": self.kind.value, **self.data}


Subscriber = Callable[[Event], None]


class EventLog:
    """Every event of one run in order (``events``, as dicts); subscribers see each as it is published.

    A subscriber marked ``side`` (metrics, the ledger copy) never stops the job: its errors are logged."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._subscribers: list[tuple[Subscriber, bool]] = []

    def subscribe(self, fn: Subscriber, side: bool = False) -> None:
        self._subscribers.append((fn, side))

    def publish(self, kind: EventKind | str, **data: Any) -> Event:
        event = Event(EventKind(kind), data)
        if event.kind not in NOT_LOGGED:
            self.events.append(event.as_dict())
        for fn, side in self._subscribers:
            if not side:
                fn(event)
                continue
            try:
                fn(event)
            except Exception as exc:
                log.warning("farm: %s listener failed on %s: %s", getattr(fn, "__qualname__", fn), kind, exc)
        return event

    def count(self, kind: EventKind, by: str = "video") -> dict[Any, int]:
        """How many events of ``kind`` there were, per value of ``by`` (e.g. shards dispatched per video)."""
        out: dict[Any, int] = {}
        for e in self.events:
            if e["event"] == kind.value:
                out[e.get(by)] = out.get(e.get(by), 0) + 1
        return out


def progress_subscriber(progress: Callable[[str, dict[str, Any]], None]) -> Subscriber:
    """Adapt a ``progress(kind, data)`` callback (the progress bar, tests, benchmarks) to the log.

    Logged events come with ``t`` and ``event`` in ``data``, as they are stored; start and finish as given."""

    def on_event(e: Event) -> None:
        progress(e.kind.value, e.data if e.kind in NOT_LOGGED else e.as_dict())

    return on_event
