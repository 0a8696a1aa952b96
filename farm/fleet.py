"""The scheduler's view of the actor slots: loading, idle, busy, killed or gone; pings and hangs;
successors; actor and node blocklists. Pure (no Ray, no clock): it appends commands to the scheduler's
outbox, and the scheduler decides what a hang means for the work the actor held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from farm.commands import Command, Config, Emit, Kill, Ping, Replace
from farm.events import EventKind
from farm.policy import Blocklists, Failure

MAX_REPLACEMENTS = 5  # per actor slot and job


class ActorState(Enum):
    LOADING = "loading"  # started, its model not yet loaded
    IDLE = "idle"
    BUSY = "busy"  # an attempt on it, maybe more queued behind (a cancelled copy keeps it busy until it stops)
    KILLED = "killed"  # killed by the scheduler; its death is on its way back
    GONE = "gone"  # retired or blocklisted: no more work, no successor


@dataclass
class Actor:
    slot: int
    state: ActorState = ActorState.LOADING
    generation: int = 0
    node: str | None = None
    attempt: int | None = None  # the attempt that has (or is next to get) the actor's model
    queued: list[int] = field(default_factory=list)  # attempts sent behind it (Config.queue > 1)
    retired: str | None = None
    ping_out: bool = False
    ping_sent: float = -math.inf


class Fleet:
    def __init__(self, config: Config, n: int, out: list[Command]) -> None:
        self.config = config
        self.actors = [Actor(k) for k in range(n)]
        self.blocklists = Blocklists(config.blocklist_after)
        self.alive_nodes: set[str] = set()
        self.draining: set[str] = set()  # nodes about to be taken (farm.drain): no work, no successor there
        self.max_call_s = 0.0  # the longest single render call any actor reported
        self.ever_ready = False
        self.out = out
        self.orphans: list[int] = []  # attempts queued on actors killed before they began: to dispatch again

    def idle(self) -> list[int]:
        return [a.slot for a in self.actors if a.state == ActorState.IDLE and a.node not in self.draining]

    def queueable(self) -> list[int]:
        """Busy actors that take one more shard behind what they hold (``Config.queue``)."""
        return [a.slot for a in self.actors if a.state == ActorState.BUSY and a.node not in self.draining
                and 1 + len(a.queued) < self.config.queue]

    def live(self) -> set[int]:
        return {a.slot for a in self.actors if a.state != ActorState.GONE}

    def all_gone(self) -> bool:
        return all(a.state == ActorState.GONE for a in self.actors)

    def loading(self) -> bool:
        return any(a.state == ActorState.LOADING for a in self.actors)

    def why_gone(self) -> str:
        return "; ".join(f"actor {a.slot}: {a.retired}" for a in self.actors if a.retired)

    # ---- what the pool reports ---------------------------------------------------------------

    def ready(self, slot: int, info: dict[str, Any], generation: int) -> None:
        a = self.actors[slot]
        if a.state != ActorState.LOADING or generation != a.generation:
            return
        a.state, a.node, a.ping_out, a.ping_sent = ActorState.IDLE, info.get("node") or a.node, False, -math.inf
        self.ever_ready = True
        if not generation:  # a successor is part of its predecessor's story (actor_replaced)
            self.emit(EventKind.ACTOR_READY, actor=slot, **info)

    def lost(self, slot: int, failure: Failure, generation: int | None) -> None:
        """Gone outside any attempt: it failed to load, or a ping found it dead."""
        a = self.actors[slot]
        if generation is not None and generation != a.generation:
            return  # about an actor this slot has replaced already
        a.ping_out = False
        if a.state == ActorState.LOADING and a.generation == 0:
            a.state, a.retired = ActorState.GONE, f"did not load: {failure.message}"
            self.emit(EventKind.ACTOR_REFUSED, actor=slot, error=failure.message, detail=failure.detail)
        elif a.state == ActorState.LOADING or (a.state == ActorState.IDLE and failure.actor_died):
            if a.state == ActorState.IDLE:
                self.emit(EventKind.ACTOR_DIED, actor=slot, error=failure.message)
            self.replace(slot)

    def beat(self, slot: int, generation: int, beat: dict[str, Any]) -> str | None:
        """A ping's answer; returns why the actor is hung when one render call ran past
        max(stall_s, 4x the longest call seen)."""
        a = self.actors[slot]
        if generation != a.generation or a.state not in (ActorState.IDLE, ActorState.BUSY):
            return None
        a.ping_out = False
        a.node = beat.get("node") or a.node
        self.max_call_s = max(self.max_call_s, beat.get("max_call_s", 0.0))
        limit = max(self.config.stall_s, 4 * self.max_call_s)
        if a.state == ActorState.BUSY and beat.get("call_s", 0.0) > limit:
            return f"one render call has run {beat['call_s']:.0f} s (limit {limit:.0f} s)"
        return None

    def heartbeats(self, now: float) -> list[tuple[int, str]]:
        """Ping every live actor; returns the hung ones: a ping unanswered for heartbeat_s."""
        hb = self.config.heartbeat_s
        hung: list[tuple[int, str]] = []
        if hb is None:
            return hung
        for a in self.actors:
            if a.state not in (ActorState.IDLE, ActorState.BUSY):
                continue
            if a.ping_out:
                if now - a.ping_sent > hb:
                    hung.append((a.slot, f"no heartbeat for {hb:g} s"))
            elif now - a.ping_sent >= min(1.0, hb / 4):
                a.ping_out, a.ping_sent = True, now
                self.out.append(Ping(a.slot, a.generation))
        return hung

    # ---- decisions ---------------------------------------------------------------------------

    def take(self, slot: int, attempt: int) -> None:
        a = self.actors[slot]
        if a.attempt is None:
            a.state, a.attempt = ActorState.BUSY, attempt
        else:
            a.queued.append(attempt)

    def free(self, slot: int, attempt: int) -> int | None:
        """``attempt`` has ended; returns the queued attempt that now has the actor's model, if any."""
        a = self.actors[slot]
        if attempt in a.queued:
            a.queued.remove(attempt)
            return None
        if a.attempt != attempt:
            return None
        a.attempt = a.queued.pop(0) if a.queued else None
        if a.attempt is None and a.state == ActorState.BUSY:
            a.state = ActorState.IDLE
        return a.attempt

    def hang(self, slot: int, reason: str, data: dict[str, Any]) -> None:
        """Kill a hung actor; a held attempt comes back as an actor death (and the actor is replaced then)."""
        actor = self.actors[slot]
        self.emit(EventKind.ACTOR_HUNG, actor=slot, reason=reason, **data)
        self.charge(slot)
        actor.ping_out = False
        idle = actor.attempt is None
        self.kill(slot)
        if idle:  # nothing will report the death, so replace it here
            self.replace(slot)
        self.blocklist(slot)

    def kill(self, slot: int) -> None:
        actor = self.actors[slot]
        if actor.state in (ActorState.IDLE, ActorState.BUSY, ActorState.LOADING):
            self.out.append(Kill(slot))
            actor.state = ActorState.KILLED
            self.orphans += actor.queued
            actor.queued = []

    def replace(self, slot: int) -> None:
        a = self.actors[slot]
        a.attempt, a.queued, a.ping_out, a.node = None, [], False, None
        if a.retired:  # blocklisted or retired: its death needs no successor
            a.state = ActorState.GONE
            return
        a.generation += 1
        if a.generation > MAX_REPLACEMENTS:  # it keeps dying: stop feeding it work
            a.state, a.retired = ActorState.GONE, f"died {a.generation} times"
            self.emit(EventKind.ACTOR_RETIRED, actor=slot)
            return
        a.state = ActorState.LOADING
        self.out.append(Replace(slot, a.generation, frozenset(self.blocklists.blocked_nodes | self.draining)))
        self.emit(EventKind.ACTOR_REPLACED, actor=slot, generation=a.generation)

    def charge(self, slot: int) -> None:
        a = self.actors[slot]
        self.blocklists.charge(slot, a.generation, a.node)

    def blocklist(self, slot: int) -> None:
        """After a charged failure: blocklist the actor, then maybe its node (its actors move elsewhere)."""
        a = self.actors[slot]
        n = self.blocklists.actor_due(slot)
        if n is not None and not a.retired:
            a.retired = f"blocklisted after {n} failed shards"
            self.kill(slot)  # its attempt (if any) comes back as a death and gets no successor
            a.state = ActorState.GONE
            self.emit(EventKind.ACTOR_BLOCKLISTED, actor=slot, failures=n)
        node = a.node
        failures = self.blocklists.node_due(node, self.alive_nodes)
        if failures is None:
            return
        self.emit(EventKind.NODE_BLOCKLISTED, node=node, failures=len(failures), actors=len(set(failures)))
        for other in self.actors:  # its actors move to other nodes (Replace avoids blocklisted nodes)
            if other.node != node:
                continue
            if other.state != ActorState.GONE:
                self.kill(other.slot)
            elif other.retired and other.retired.startswith("blocklisted"):  # its failures were the node's
                other.retired = None
                self.blocklists.forgive(other.slot)
            else:
                continue
            if other.attempt is None:  # idle: no attempt will report its death, so replace it here
                self.replace(other.slot)
            else:
                other.state = ActorState.KILLED  # its attempt comes back as a death: replaced then

    def emit(self, kind: EventKind, **data: Any) -> None:
        self.out.append(Emit(kind, data))
