"""The scheduler as a pure state machine: it is told what happened and answers what to do next.

Fed ``on_actor_ready / on_actor_lost / on_beat / on_done / on_failed`` (and ``on_nodes``), it answers
``decide(now) -> list[Command]``. It imports no Ray and reads no clock (``now`` is passed in), so every
rule is tested without a cluster (``tests/test_schedule.py``). The driver applies the commands in order
through the actor pool; ``Emit`` commands are the run's events, placed where they happen.

Failure rules, blocklists, speculation and the failure budget are in ``farm.policy``. A later rule (e.g.
draining a node before preemption) is one more ``on_*`` input and a check in ``_fill``: an actor's node
is known (``Actor.node``), and ``Dispatch``/``Cancel``/``Replace`` already say everything the pool does.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from farm.events import EventKind
from farm.graph import ACTOR_KINDS, Kind, Unit
from farm.policy import Blocklists, Budget, Failure, Speculation, determine

MAX_REPLACEMENTS = 5  # per actor slot and job


class UnitState(Enum):
    WAITING = "waiting"  # some of its needs are not done
    READY = "ready"
    RUNNING = "running"  # one attempt in flight, or two (a straggler's copy)
    DONE = "done"


class ActorState(Enum):
    LOADING = "loading"  # started, its model not yet loaded
    IDLE = "idle"
    BUSY = "busy"  # one attempt on it (a cancelled copy keeps it busy until it stops)
    KILLED = "killed"  # killed by the scheduler; its death is on its way back
    GONE = "gone"  # retired or blocklisted: no more work, no successor


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
class Cancel:
    """Stop the losing copy ``attempt`` on ``slot``; it stays in flight until it has stopped."""

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
    """Start a successor in ``slot``, off the blocklisted nodes."""

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


Command = Dispatch | Launch | Cancel | Ping | Kill | Replace | FailVideo | FinishVideo | Emit


@dataclass(frozen=True)
class Config:
    retries: int = 2
    speculative: bool = True  # False for handoff chains and when the spec turns it off
    heartbeat_s: float | None = 30.0
    stall_s: float = 300.0
    blocklist_after: int = 3
    max_failed_shards: int | None = None


# ---- state -------------------------------------------------------------------------------------


@dataclass
class Actor:
    slot: int
    state: ActorState = ActorState.LOADING
    generation: int = 0
    node: str | None = None
    attempt: int | None = None
    retired: str | None = None
    ping_out: bool = False
    ping_sent: float = 0.0


@dataclass
class Attempt:
    id: int
    video: str
    unit: Unit
    slot: int | None
    number: int
    started: float
    abandoned: bool = False  # a cancelled copy: only its actor still matters


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


# ---- the scheduler -----------------------------------------------------------------------------


class Scheduler:
    def __init__(self, config: Config, actors: int) -> None:
        self.config = config
        self.actors = [Actor(k) for k in range(actors)]
        self.videos: dict[str, VideoWork] = {}
        self.attempts: dict[int, Attempt] = {}
        self.prep: deque[str] = deque()  # videos whose prepare is ready, dispatched before any shard
        self.blocklists = Blocklists(config.blocklist_after)
        self.speculation = Speculation(config.speculative)
        self.budget = Budget(config.max_failed_shards)
        self.alive_nodes: set[str] = set()
        self.max_call_s = 0.0  # the longest single render call any actor reported
        self.ever_ready = False
        self._ids = itertools.count(1)
        self._out: list[Command] = []

    # ---- inputs ------------------------------------------------------------------------------

    def add_video(self, key: str, units: list[Unit], frame_count: int, done: set[str] = frozenset()) -> None:
        """Schedule a video; ``done``: units the ledger already has (resume). Add longest videos first."""
        v = self.videos[key] = VideoWork(key, units, frame_count, set(done), len(self.videos))
        if "prepare" in v.ready:
            v.ready.discard("prepare")
            self.prep.append(key)

    def on_nodes(self, alive: set[str]) -> None:
        self.alive_nodes = set(alive)

    def on_actor_ready(self, slot: int, info: dict[str, Any], generation: int = 0) -> None:
        a = self.actors[slot]
        if a.state != ActorState.LOADING or generation != a.generation:
            return
        a.state, a.node, a.ping_out, a.ping_sent = ActorState.IDLE, info.get("node") or a.node, False, -math.inf
        self.ever_ready = True
        if not generation:  # a successor is part of its predecessor's story (actor_replaced)
            self._emit(EventKind.ACTOR_READY, actor=slot, **info)

    def on_actor_lost(self, slot: int, failure: Failure, generation: int | None = None) -> None:
        """The actor in ``slot`` is gone outside any attempt: it failed to load, or a ping found it dead."""
        a = self.actors[slot]
        if generation is not None and generation != a.generation:
            return  # about an actor this slot has replaced already
        a.ping_out = False
        if a.state == ActorState.LOADING and a.generation == 0:
            a.state, a.retired = ActorState.GONE, f"did not load: {failure.message}"
            self._emit(EventKind.ACTOR_REFUSED, actor=slot, error=failure.message)
        elif a.state == ActorState.LOADING or (a.state == ActorState.IDLE and failure.actor_died):
            if a.state == ActorState.IDLE:
                self._emit(EventKind.ACTOR_DIED, actor=slot, error=failure.message)
            self._replace(slot)

    def on_beat(self, slot: int, generation: int, beat: dict[str, Any], now: float) -> None:
        """A ping's answer: the actor is alive; a render call past max(stall_s, 4x the longest) is hung."""
        a = self.actors[slot]
        if generation != a.generation or a.state not in (ActorState.IDLE, ActorState.BUSY):
            return
        a.ping_out = False
        a.node = beat.get("node") or a.node
        self.max_call_s = max(self.max_call_s, beat.get("max_call_s", 0.0))
        limit = max(self.config.stall_s, 4 * self.max_call_s)
        if a.state == ActorState.BUSY and beat.get("call_s", 0.0) > limit:
            self._hung(slot, f"one render call has run {beat['call_s']:.0f} s (limit {limit:.0f} s)")

    def on_done(self, attempt: int, now: float, seconds: float = 0.0) -> None:
        a = self.attempts.pop(attempt)
        actor = self._free(a)
        if actor is not None and actor.state == ActorState.KILLED:
            self._replace(actor.slot)  # killed as hung, finished anyway: its successor is due
        if a.abandoned:
            return
        v, uid = self.videos[a.video], a.unit.id
        if a.unit.kind in (Kind.RENDER, Kind.REFINE):
            copies = v.copies.pop(uid, [])
            for other in copies:  # first result wins
                if other != attempt:
                    self._cancel(other)
        if not v.running:
            return
        if a.unit.kind in (Kind.RENDER, Kind.REFINE):
            self.speculation.observe(seconds, v.frames(a.unit))
        v.complete(uid)
        if a.unit.kind == Kind.COMMIT and v.succeeded():
            v.running = False
            self._out.append(FinishVideo(v.key))

    def on_failed(self, attempt: int, failure: Failure, now: float) -> None:
        a = self.attempts.pop(attempt)
        actor = self._free(a)
        v, uid = self.videos[a.video], a.unit.id
        copies = v.copies.get(uid, [])
        if attempt in copies:
            copies.remove(attempt)
        if not copies:
            v.copies.pop(uid, None)
        kind = None if a.abandoned else a.unit.kind
        verdict = determine(failure, kind, v.attempts.get(uid, 0), self.config.retries, len(copies))
        if actor is not None:
            if verdict.replace_actor or actor.state == ActorState.KILLED:
                self._replace(actor.slot)
            if verdict.charge_actor:
                self._charge(actor.slot)
                v.avoid.setdefault(uid, set()).add(actor.slot)
        if kind in (Kind.RENDER, Kind.REFINE):
            more = {"copy": True} if copies else {"attempt": v.attempts.get(uid, 0)}
            self._emit(EventKind.SHARD_FAILED, video=v.key, shard=a.unit.shard, actor=a.slot, **more,
                       error=failure.message)
        if verdict.spend_budget:
            self.budget.spend()
        if verdict.give_up:
            self._fail(v, failure.message)
        elif verdict.retry and v.running:
            if kind == Kind.PREPARE:
                self.prep.appendleft(v.key)
            else:
                v.make_ready(uid)
        if actor is not None and kind in (Kind.RENDER, Kind.REFINE):
            self._blocklist(actor.slot)

    # ---- decisions ---------------------------------------------------------------------------

    def decide(self, now: float) -> list[Command]:
        """Pings and hang checks, task units, then actor units on idle actors (copies at the tail)."""
        self._heartbeats(now)
        for v in self.running():
            for uid in sorted(u for u in v.ready if v.units[u].kind not in ACTOR_KINDS):
                self._launch(v, uid, now)
        self._fill(now)
        if self.running() and not self.attempts and not any(a.state == ActorState.LOADING for a in self.actors):
            if all(a.state == ActorState.GONE for a in self.actors):
                why = "; ".join(f"actor {a.slot}: {a.retired}" for a in self.actors if a.retired)
                message = f"no healthy actor left to render it ({why})"
            else:
                message = self.budget.message()
            for v in self.running():
                self._fail(v, message)
        out, self._out = self._out, []
        return out

    def pending(self) -> list[Command]:
        """What the inputs so far already decided (events, replacements), without deciding anything new."""
        out, self._out = self._out, []
        return out

    def running(self) -> list[VideoWork]:
        return [v for v in self.videos.values() if v.running]

    @property
    def finished(self) -> bool:
        return not self.running()

    def all_actors_gone(self) -> bool:
        return all(a.state == ActorState.GONE for a in self.actors)

    def _fill(self, now: float) -> None:
        while not self.budget.exhausted:
            idle = [a.slot for a in self.actors if a.state == ActorState.IDLE]
            if not idle:
                return
            if self.prep:
                v = self.videos[self.prep.popleft()]
                if v.running:
                    self._dispatch(idle[0], v, "prepare", now)
                continue
            # Ready shards, highest priority first: most frames left in the video (critical path).
            ready = sorted((-v.left, v.units[u].shard, v.rank, u, v) for v in self.running() for u in v.ready
                           if v.units[u].kind in ACTOR_KINDS)
            live = {a.slot for a in self.actors if a.state != ActorState.GONE}
            for *_, uid, v in ready:
                avoid = v.avoid.get(uid, set())
                fresh = [k for k in idle if k not in avoid]
                if fresh or live <= avoid:  # every actor failed it once: any may retry
                    self._dispatch((fresh or idle)[0], v, uid, now)
                    break
                # else: leave it for a busy actor that has not failed it yet
            else:
                if not self._speculate(idle, now):
                    return

    def _speculate(self, idle: list[int], now: float) -> bool:
        """At the tail (nothing else to run), copy the slowest straggler to an idle actor."""
        if not self.speculation.active():
            return False
        best = None
        for v in self.running():
            for uid, ids in v.copies.items():
                if len(ids) != 1 or (v.key, uid) in self.speculation.copied:
                    continue
                a = self.attempts[ids[0]]
                late = self.speculation.lateness(now - a.started, v.frames(a.unit))
                free = [k for k in idle if k not in v.avoid.get(uid, set())]
                if late > 1 and free and (best is None or late > best[0]):
                    best = (late, v, uid, free[0])
        if best is None:
            return False
        _, v, uid, slot = best
        self.speculation.copied.add((v.key, uid))
        self._dispatch(slot, v, uid, now, copy=True)
        return True

    def _dispatch(self, slot: int, v: VideoWork, uid: str, now: float, copy: bool = False) -> None:
        unit = v.units[uid]
        if not copy and unit.kind != Kind.PREPARE:  # a copy is not a retry: it spends none of the attempts
            v.attempts[uid] = v.attempts.get(uid, 0) + 1
        number = v.attempts.get(uid, 1)
        a = Attempt(next(self._ids), v.key, unit, slot, number, now)
        self.attempts[a.id] = a
        actor = self.actors[slot]
        actor.state, actor.attempt = ActorState.BUSY, a.id
        v.state[uid] = UnitState.RUNNING
        v.ready.discard(uid)
        self._out.append(Dispatch(a.id, slot, v.key, unit, number, copy, f".copy{number}" if copy else ""))
        if unit.kind != Kind.PREPARE:
            v.copies.setdefault(uid, []).append(a.id)
            kind = EventKind.SHARD_SPECULATED if copy else EventKind.SHARD_DISPATCHED
            self._emit(kind, video=v.key, shard=unit.shard, actor=slot, attempt=number)

    def _launch(self, v: VideoWork, uid: str, now: float) -> None:
        a = Attempt(next(self._ids), v.key, v.units[uid], None, 1, now)
        self.attempts[a.id] = a
        v.state[uid] = UnitState.RUNNING
        v.ready.discard(uid)
        self._out.append(Launch(a.id, v.key, a.unit))

    def _cancel(self, attempt: int) -> None:
        a = self.attempts[attempt]
        a.abandoned = True
        self._out.append(Cancel(attempt, a.slot, a.video, a.unit.shard))
        self._emit(EventKind.SHARD_CANCELLED, video=a.video, shard=a.unit.shard, actor=a.slot,
                   reason="another copy finished first")

    def _fail(self, v: VideoWork, message: str) -> None:
        if v.running:
            v.running = False
            self._out.append(FailVideo(v.key, message))

    # ---- actors ------------------------------------------------------------------------------

    def _free(self, a: Attempt) -> Actor | None:
        if a.slot is None:
            return None
        actor = self.actors[a.slot]
        if actor.attempt == a.id:
            actor.attempt = None
            if actor.state == ActorState.BUSY:
                actor.state = ActorState.IDLE
        return actor

    def _heartbeats(self, now: float) -> None:
        """Ping every live actor; a ping unanswered for heartbeat_s means hung."""
        hb = self.config.heartbeat_s
        if hb is None:
            return
        for a in self.actors:
            if a.state not in (ActorState.IDLE, ActorState.BUSY):
                continue
            if a.ping_out:
                if now - a.ping_sent > hb:
                    self._hung(a.slot, f"no heartbeat for {hb:g} s")
            elif now - a.ping_sent >= min(1.0, hb / 4):
                a.ping_out, a.ping_sent = True, now
                self._out.append(Ping(a.slot, a.generation))

    def _hung(self, slot: int, reason: str) -> None:
        """Kill a hung actor; its attempt comes back as an actor death and goes to another actor."""
        actor = self.actors[slot]
        a = self.attempts.get(actor.attempt) if actor.attempt is not None else None
        data: dict[str, Any] = {}
        if a is not None and not a.abandoned and a.unit.kind in (Kind.RENDER, Kind.REFINE):
            self.videos[a.video].avoid.setdefault(a.unit.id, set()).add(slot)
            data = {"video": a.video, "shard": a.unit.shard}
        self._emit(EventKind.ACTOR_HUNG, actor=slot, reason=reason, **data)
        self._charge(slot)
        actor.ping_out = False
        self._kill(slot)
        if a is None:  # idle: nothing will report the death, so replace it here
            self._replace(slot)
        self._blocklist(slot)

    def _kill(self, slot: int) -> None:
        actor = self.actors[slot]
        if actor.state in (ActorState.IDLE, ActorState.BUSY, ActorState.LOADING):
            self._out.append(Kill(slot))
            actor.state = ActorState.KILLED

    def _replace(self, slot: int) -> None:
        a = self.actors[slot]
        a.attempt, a.ping_out, a.node = None, False, None
        if a.retired:  # blocklisted or retired: its death needs no successor
            a.state = ActorState.GONE
            return
        a.generation += 1
        if a.generation > MAX_REPLACEMENTS:  # it keeps dying: stop feeding it work
            a.state, a.retired = ActorState.GONE, f"died {a.generation} times"
            self._emit(EventKind.ACTOR_RETIRED, actor=slot)
            return
        a.state = ActorState.LOADING
        self._out.append(Replace(slot, a.generation, frozenset(self.blocklists.blocked_nodes)))
        self._emit(EventKind.ACTOR_REPLACED, actor=slot, generation=a.generation)

    def _charge(self, slot: int) -> None:
        a = self.actors[slot]
        self.blocklists.charge(slot, a.generation, a.node)

    def _blocklist(self, slot: int) -> None:
        a = self.actors[slot]
        n = self.blocklists.actor_due(slot)
        if n is not None and not a.retired:
            a.retired = f"blocklisted after {n} failed shards"
            self._kill(slot)  # its attempt (if any) comes back as a death and gets no successor
            a.state = ActorState.GONE
            self._emit(EventKind.ACTOR_BLOCKLISTED, actor=slot, failures=n)
        node = a.node
        failures = self.blocklists.node_due(node, self.alive_nodes)
        if failures is None:
            return
        self._emit(EventKind.NODE_BLOCKLISTED, node=node, failures=len(failures), actors=len(set(failures)))
        for other in self.actors:  # its actors move to other nodes (Replace avoids blocklisted nodes)
            if other.node != node:
                continue
            if other.state != ActorState.GONE:
                self._kill(other.slot)
            elif other.retired and other.retired.startswith("blocklisted"):  # its failures were the node's
                other.retired = None
                self.blocklists.forgive(other.slot)
            else:
                continue
            if other.attempt is None:  # idle: no attempt will report its death, so replace it here
                self._replace(other.slot)
            else:
                other.state = ActorState.KILLED  # its attempt comes back as a death: replaced then

    def _emit(self, kind: EventKind, **data: Any) -> None:
        self._out.append(Emit(kind, data))
