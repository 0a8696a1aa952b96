"""What the scheduler does about failures and stragglers: pure rules, no Ray, no clock of their own.

- ``determine``: the one function that decides what a failed attempt means (as OpenCue's
  ``determineFrameState``): replace the actor, charge it (and its node), retry elsewhere, or give up.
- ``Blocklists``: an actor that failed ``blocklist_after`` shards gets no more; a node whose actors
  (more than one) failed that many is blocklisted while another node is alive.
- ``Speculation``: at the tail, the slowest straggler is copied to an idle actor; the first result wins.
- ``Budget``: the job stops dispatching after ``max_failed_shards`` shards failed for good.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from farm.graph import Kind


@dataclass(frozen=True)
class Failure:
    """Why an attempt did not finish, in the scheduler's terms (the pool turns Ray's exceptions into this)."""

    message: str  # one line, credentials removed
    actor_died: bool = False  # the actor process is gone (killed, crashed, node lost): not the call's own error
    input_error: bool = False  # about the input itself: retrying on another actor cannot help
    detail: str | None = None  # a traceback for the ledger's events (a model that did not load), never printed


@dataclass(frozen=True)
class Verdict:
    replace_actor: bool = False  # start a successor in the slot (the actor is gone)
    charge_actor: bool = False  # count it against the actor and its node; the unit avoids that actor
    retry: bool = False  # the unit goes back to ready (another copy still running needs no retry)
    give_up: bool = False  # the video fails with the failure's message
    spend_budget: bool = False  # counts against max_failed_shards


def determine(failure: Failure, kind: Kind | None, attempts: int, retries: int, copies_left: int) -> Verdict:
    """What a failed attempt does. ``kind`` None: a cancelled copy (its actor only matters);
    ``attempts``: dispatches of the unit so far (copies excluded); ``copies_left``: its other attempts
    still running."""
    died = failure.actor_died
    if kind is None:
        return Verdict(replace_actor=died)
    if kind in (Kind.BLEND, Kind.COMMIT):  # tasks Ray already retried (max_retries)
        return Verdict(give_up=True)
    if kind == Kind.PREPARE:  # the actor's death is not the video's fault: prepare again elsewhere
        return Verdict(replace_actor=True, retry=True) if died else Verdict(give_up=True)
    if copies_left:  # the other copy may still finish: only the actor is charged
        return Verdict(replace_actor=died, charge_actor=not died)
    final = failure.input_error or attempts > retries
    return Verdict(replace_actor=died, charge_actor=not died, retry=not final, give_up=final, spend_budget=final)


@dataclass
class Blocklists:
    """Failures per actor slot and per node, and the actors and nodes that get no more work."""

    after: int  # scheduler.blocklist_after
    actor_failures: dict[int, int] = field(default_factory=dict)
    node_failures: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # node -> (slot, generation)
    blocked_nodes: set[str] = field(default_factory=set)

    def charge(self, slot: int, generation: int, node: str | None) -> None:
        self.actor_failures[slot] = self.actor_failures.get(slot, 0) + 1
        if node:
            self.node_failures.setdefault(node, []).append((slot, generation))

    def actor_due(self, slot: int) -> int | None:
        """The slot's failure count once it reached ``after``, else None."""
        n = self.actor_failures.get(slot, 0)
        return n if n >= self.after else None

    def node_due(self, node: str | None, alive_nodes: set[str]) -> list[tuple[int, int]] | None:
        """The node's failures when it is to be blocklisted now: ``after`` of them, from more than one actor
        (one bad actor is the actor blocklist's business), and another node is alive (blocking the only
        node would stop the job rather than route around a bad node)."""
        failures = self.node_failures.get(node or "", [])
        if not node or node in self.blocked_nodes or len(failures) < self.after or len(set(failures)) < 2:
            return None
        if not alive_nodes - self.blocked_nodes - {node}:
            return None
        self.blocked_nodes.add(node)
        return failures

    def forgive(self, slot: int) -> None:
        self.actor_failures[slot] = 0


@dataclass
class Speculation:
    """Straggler copies, for units whose output depends on no other attempt's state."""

    enabled: bool
    per_frame: list[float] = field(default_factory=list)  # seconds per frame of finished shards: what "slow" is
    copied: set[tuple[str, str]] = field(default_factory=set)  # (video, unit) that already got their one copy

    def observe(self, seconds: float, frames: int) -> None:
        self.per_frame.append(seconds / max(frames, 1))

    def lateness(self, running_s: float, frames: int) -> float:
        """How many times over 1.5x the median time for its frames a running shard is (>1: a straggler)."""
        return running_s / max(1.5 * (self.rate() or 0.0) * frames, 1e-3)

    def rate(self) -> float | None:
        """The median seconds per frame of the finished shards; None before one finished."""
        return sorted(self.per_frame)[len(self.per_frame) // 2] if self.per_frame else None

    def active(self) -> bool:
        return self.enabled and bool(self.per_frame)


@dataclass
class Budget:
    max_failed_shards: int | None
    failed_shards: int = 0

    def spend(self) -> None:
        self.failed_shards += 1

    @property
    def exhausted(self) -> bool:
        return self.max_failed_shards is not None and self.failed_shards > self.max_failed_shards

    def message(self) -> str:
        return (f"stopped, job failure budget max_failed_shards={self.max_failed_shards} exhausted "
                f"({self.failed_shards} shards failed)")
