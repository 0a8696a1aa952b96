"""The scheduler as a pure state machine: it is told what happened and answers what to do next.

Fed ``on_actor_ready / on_actor_lost / on_beat / on_done / on_failed`` (and ``on_nodes``), it answers
``decide(now) -> list[Command]``. It imports no Ray and reads no clock (``now`` is passed in), so every
rule is tested without a cluster (``tests/test_schedule.py``). The driver applies the commands in order
through the actor pool; ``Emit`` commands are the run's events, placed where they happen.

What a failure means, blocklists, speculation and the failure budget are in ``farm.policy``; the actor
slots (states, pings, successors, blocklisting) in ``farm.fleet``; the commands in ``farm.commands``.

A later rule is a policy addition, not a rewrite. Draining a node before preemption, for one
(``farm.drain``): ``on_node_draining(node, deadline)`` marks the node in the fleet (``Replace`` keeps
successors off it, ``Fleet.idle`` leaves out its actors, so ``_fill`` dispatches nothing there), and
its in-flight stateless shards that would not finish by the deadline are copied (first result wins), and
a handoff chain's shard is checkpointed (``Checkpoint``, then ``on_checkpointed``: it continues elsewhere).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from farm.commands import (  # noqa: F401 (the commands are this module's answers: importable from here)
    Cancel,
    Checkpoint,
    Command,
    Config,
    Dispatch,
    Emit,
    FailVideo,
    FinishVideo,
    Kill,
    Launch,
    Ping,
    Prefetch,
    Replace,
)
from farm.drain import Drain
from farm.events import EventKind
from farm.fleet import Actor, ActorState, Fleet
from farm.graph import ACTOR_KINDS, Kind, Unit
from farm.policy import Blocklists, Budget, Failure, Speculation, determine


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


# ---- the scheduler -----------------------------------------------------------------------------


class Scheduler:
    def __init__(self, config: Config, actors: int) -> None:
        self.config = config
        self._out: list[Command] = []
        self.fleet = Fleet(config, actors, self._out)
        self.videos: dict[str, VideoWork] = {}
        self.attempts: dict[int, Attempt] = {}
        self.prep: deque[str] = deque()  # videos whose prepare is ready, dispatched before any shard
        self.speculation = Speculation(config.speculative)
        self.budget = Budget(config.max_failed_shards)
        self._ids = itertools.count(1)
        self.hinted: dict[int, tuple[str, str]] = {}  # slot -> (video, unit) it was told to prefetch
        self.drain = Drain(config.preemption == "drain", config.drain_min_deadline_s, config.handoff)

    @property
    def actors(self) -> list[Actor]:
        return self.fleet.actors

    @property
    def blocklists(self) -> Blocklists:
        return self.fleet.blocklists

    @property
    def ever_ready(self) -> bool:
        return self.fleet.ever_ready

    def all_actors_gone(self) -> bool:
        return self.fleet.all_gone()

    # ---- inputs ------------------------------------------------------------------------------

    def add_video(self, key: str, units: list[Unit], frame_count: int, done: set[str] = frozenset()) -> None:
        """Schedule a video; ``done``: units the ledger already has (resume). Add longest videos first."""
        v = self.videos[key] = VideoWork(key, units, frame_count, set(done), len(self.videos))
        if "prepare" in v.ready:
            v.ready.discard("prepare")
            self.prep.append(key)

    def on_nodes(self, alive: set[str]) -> None:
        self.fleet.alive_nodes = set(alive)

    def on_node_draining(self, node: str, deadline: float, now: float) -> None:
        """``node`` is to be taken by ``deadline`` (math.inf: no deadline given): ``farm.drain``."""
        self.drain.notice(self, node, deadline, now)

    def on_node_undrained(self, node: str) -> None:
        self.drain.lift(self, node)

    def on_actor_ready(self, slot: int, info: dict[str, Any], generation: int = 0) -> None:
        self.fleet.ready(slot, info, generation)

    def on_actor_lost(self, slot: int, failure: Failure, generation: int | None = None) -> None:
        """The actor in ``slot`` is gone outside any attempt: it failed to load, or a ping found it dead."""
        self.fleet.lost(slot, failure, generation)

    def on_beat(self, slot: int, generation: int, beat: dict[str, Any], now: float) -> None:
        """A ping's answer: the actor is alive; a render call past max(stall_s, 4x the longest) is hung."""
        reason = self.fleet.beat(slot, generation, beat)
        if reason:
            self._hung(slot, reason)

    def on_done(self, attempt: int, now: float, seconds: float = 0.0) -> None:
        """``seconds``: the shard's own render time (not its wait behind another shard on the actor)."""
        a = self.attempts.pop(attempt)
        actor = self._release(a, now)
        if actor is not None and actor.state == ActorState.KILLED:
            self.fleet.replace(actor.slot)  # killed as hung, finished anyway: its successor is due
        if a.abandoned:
            return
        v, uid = self.videos[a.video], a.unit.id
        if a.unit.kind in (Kind.RENDER, Kind.REFINE):
            for other in v.copies.pop(uid, []):  # first result wins
                if other != attempt:
                    self._cancel(other, now)
        if not v.running:
            return
        if a.unit.kind in (Kind.RENDER, Kind.REFINE):
            self.speculation.observe(seconds, v.frames(a.unit))
        v.complete(uid)
        if a.unit.kind == Kind.COMMIT and v.succeeded():
            v.running = False
            self._out.append(FinishVideo(v.key))

    def on_checkpointed(self, attempt: int, at: int, now: float, frames_lost: int = 0) -> None:
        """``attempt`` stopped at frame ``at`` (a ``Checkpoint``) and left a partial record: its actor is free
        and the shard is ready again, to continue from ``at`` on a healthy actor (``farm.drain``)."""
        a = self.attempts.pop(attempt)
        actor = self.fleet.free(a.slot, attempt) if a.slot is not None else None
        if actor is not None and actor.state == ActorState.KILLED:
            self.fleet.replace(actor.slot)
        self.videos[a.video].copies.pop(a.unit.id, None)
        self.drain.checkpointed(self, a, actor.node if actor is not None else None, at, frames_lost)

    def on_failed(self, attempt: int, failure: Failure, now: float) -> None:
        """What a failed attempt does, decided by ``policy.determine`` alone."""
        a = self.attempts.pop(attempt)
        actor = self._release(a, now)
        node_lost = actor is not None and failure.actor_died and self._node_gone(actor.node)
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
                self.fleet.replace(actor.slot)
            if verdict.charge_actor:
                self.fleet.charge(actor.slot)
                v.avoid.setdefault(uid, set()).add(actor.slot)
        if kind in (Kind.RENDER, Kind.REFINE):
            more: dict[str, Any] = {"copy": True} if copies else {"attempt": v.attempts.get(uid, 0)}
            if node_lost:  # what the node's loss cost: the frames this attempt had rendered, redone elsewhere
                more.update(node_lost=True, frames_lost=self._frames_lost(a, now))
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
            self.fleet.blocklist(actor.slot)

    # ---- decisions ---------------------------------------------------------------------------

    def decide(self, now: float) -> list[Command]:
        """Pings and hang checks, task units, then actor units on idle actors (copies at the tail)."""
        for slot, reason in self.fleet.heartbeats(now):
            self._hung(slot, reason)
        for v in self.running():
            for uid in sorted(u for u in v.ready if v.units[u].kind not in ACTOR_KINDS):
                self._launch(v, uid, now)
        self.drain.step(self, now)
        self._fill(now)
        if self.running() and not self.attempts and not self.fleet.loading():
            if self.fleet.all_gone():
                message = f"no healthy actor left to render it ({self.fleet.why_gone()})"
            else:
                message = self.budget.message()
            for v in self.running():
                self._fail(v, message)
        return self.pending()

    def pending(self) -> list[Command]:
        """What the inputs so far decided (events, successors), handed over once."""
        out = list(self._out)
        self._out.clear()
        return out

    def running(self) -> list[VideoWork]:
        return [v for v in self.videos.values() if v.running]

    @property
    def finished(self) -> bool:
        return not self.running()

    def _release(self, a: Attempt, now: float) -> Actor | None:
        """The actor ``a`` ran on, freed of it (None for a task, or when that actor was replaced since); an
        attempt queued behind it now has the model, and its running time counts from now."""
        if a.slot is None or self.fleet.actors[a.slot].generation != a.generation:
            return None
        promoted = self.fleet.free(a.slot, a.id)
        if promoted is not None:
            self.attempts[promoted].started = now
        return self.fleet.actors[a.slot]

    def _ready(self) -> list[tuple[str, VideoWork]]:
        """Ready actor units, highest priority first: most frames left in the video (the critical path)."""
        ready = sorted((-v.left, v.units[u].shard, v.rank, u, v) for v in self.running() for u in v.ready
                       if v.units[u].kind in ACTOR_KINDS)
        return [(uid, v) for *_, uid, v in ready]

    def _fill(self, now: float) -> None:
        """Idle actors first (ready shards, else a queued one moved over, else a straggler's copy), then
        queues behind busy actors."""
        self._requeue_orphans()
        while not self.budget.exhausted:
            idle = self.fleet.idle()
            if not idle:
                break
            if self.prep:
                v = self.videos[self.prep.popleft()]
                if v.running:
                    self._dispatch(idle[0], v, "prepare", now)
                continue
            live = self.fleet.live()
            for uid, v in self._ready():
                avoid = v.avoid.get(uid, set())
                fresh = [k for k in idle if k not in avoid]
                fresh.sort(key=lambda k: self.hinted.get(k) != (v.key, uid))  # the actor already decoding it first
                if fresh or live <= avoid:  # every actor failed it once: any may retry
                    self._dispatch((fresh or idle)[0], v, uid, now)
                    break
                # else: leave it for a busy actor that has not failed it yet
            else:
                if not self._steal(idle, now) and not self._speculate(idle, now):
                    break
        self._queue(now)

    def _requeue_orphans(self) -> None:
        """Shards queued on an actor that was killed (hung, blocklisted) before they began: ready again,
        spending none of their attempts (their death, when it comes back, is an abandoned copy's)."""
        while self.fleet.orphans:
            a = self.attempts.get(self.fleet.orphans.pop(0))
            if a is None or a.abandoned:
                continue
            a.abandoned = True
            v, uid = self.videos[a.video], a.unit.id
            copies = v.copies.get(uid, [])
            if a.id in copies:
                copies.remove(a.id)
            if not copies:
                v.copies.pop(uid, None)
                if not a.copy:
                    v.attempts[uid] -= 1
                if v.running and v.state[uid] == UnitState.RUNNING:
                    v.make_ready(uid)
            self._emit(EventKind.SHARD_CANCELLED, video=v.key, shard=a.unit.shard, actor=a.slot,
                       reason="its actor was stopped before the shard began")

    def _queue(self, now: float) -> None:
        """Ready shards behind busy actors' current ones (``Config.queue`` > 1): an actor's next model calls
        then start as soon as its current shard's last call ends, while that shard's encoders finish."""
        while not self.budget.exhausted:
            slots = self.fleet.queueable()
            for uid, v in self._ready():
                fresh = [k for k in slots if k not in v.avoid.get(uid, set())]
                if fresh:  # the actor decoding it already, else the one whose current shard started first
                    fresh.sort(key=lambda k: (self.hinted.get(k) != (v.key, uid), self._started(k)))
                    self._dispatch(fresh[0], v, uid, now)
                    break
            else:
                return

    def _started(self, slot: int) -> float:
        attempt = self.fleet.actors[slot].attempt
        return self.attempts[attempt].started if attempt in self.attempts else 0.0

    def _steal(self, idle: list[int], now: float) -> bool:
        """An idle actor takes a shard queued behind another actor's current one (not started there): that
        queued call is cancelled, so no actor idles while another holds work it has not begun."""
        for actor in self.fleet.actors:
            for attempt in actor.queued:
                a = self.attempts[attempt]
                v = self.videos[a.video]
                free = [k for k in idle if k not in v.avoid.get(a.unit.id, set())]
                if a.abandoned or not v.running or not free:
                    continue
                v.copies[a.unit.id].remove(attempt)
                self._cancel(attempt, now, reason="moved to an idle actor")
                self._dispatch(free[0], v, a.unit.id, now, moved_from=a.slot)
                return True
        return False

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

    def _dispatch(self, slot: int, v: VideoWork, uid: str, now: float, copy: bool = False,
                  moved_from: int | None = None) -> None:
        """``copy``: a second attempt beside a running one; ``moved_from``: the slot whose queued, not begun,
        attempt this one replaces. Neither spends one of the unit's attempts, and both write under a tag of
        their own (the other attempt's parts are never overwritten)."""
        unit = v.units[uid]
        spare = copy or moved_from is not None
        if not spare and unit.kind != Kind.PREPARE:  # a copy is not a retry: it spends none of the attempts
            v.attempts[uid] = v.attempts.get(uid, 0) + 1
        number = v.attempts.get(uid, 1)
        a = Attempt(next(self._ids), v.key, unit, slot, number, now, self.fleet.actors[slot].generation, copy=spare)
        self.attempts[a.id] = a
        self.fleet.take(slot, a.id)
        v.state[uid] = UnitState.RUNNING
        v.ready.discard(uid)
        tag = f".copy{number}" if copy else f".moved{a.id}" if moved_from is not None else ""
        self._out.append(Dispatch(a.id, slot, v.key, unit, number, spare, tag))
        if unit.kind != Kind.PREPARE:
            v.copies.setdefault(uid, []).append(a.id)
            kind = EventKind.SHARD_SPECULATED if copy else EventKind.SHARD_DISPATCHED
            more = {"moved_from": moved_from} if moved_from is not None else {}
            self._emit(kind, video=v.key, shard=unit.shard, actor=slot, attempt=number, **more)
            for k in [k for k, h in self.hinted.items() if h == (v.key, uid)]:
                del self.hinted[k]
            if not copy and self.config.prefetch:
                self._hint(slot, v, unit)

    def _hint(self, slot: int, v: VideoWork, unit: Unit) -> None:
        """The unit of the same pass after ``unit`` that is neither done, running nor hinted elsewhere."""
        taken = set(self.hinted.values())
        later = sorted((u for u in v.units.values() if u.kind == unit.kind and (u.shard or 0) > (unit.shard or 0)),
                       key=lambda u: u.shard or 0)
        for u in later:
            if v.state[u.id] in (UnitState.WAITING, UnitState.READY) and (v.key, u.id) not in taken:
                self.hinted[slot] = (v.key, u.id)
                self._out.append(Prefetch(slot, v.key, u))
                return

    def _launch(self, v: VideoWork, uid: str, now: float) -> None:
        a = Attempt(next(self._ids), v.key, v.units[uid], None, 1, now)
        self.attempts[a.id] = a
        v.state[uid] = UnitState.RUNNING
        v.ready.discard(uid)
        self._out.append(Launch(a.id, v.key, a.unit))

    def _cancel(self, attempt: int, now: float, reason: str = "another copy finished first") -> None:
        a = self.attempts[attempt]
        a.abandoned = True
        self._out.append(Cancel(attempt, a.slot, a.video, a.unit.shard))
        more = {"frames_lost": self._frames_lost(a, now)} if (a.video, a.unit.id) in self.drain.moved else {}
        self._emit(EventKind.SHARD_CANCELLED, video=a.video, shard=a.unit.shard, actor=a.slot, reason=reason,
                   **more)

    def _node_gone(self, node: str | None) -> bool:
        """Whether ``node`` was drained or is no longer alive (an actor's death there is the node's loss)."""
        alive = self.fleet.alive_nodes
        return node is not None and (node in self.drain.nodes or bool(alive) and node not in alive)

    def _frames_lost(self, a: Attempt, now: float) -> int:
        return self.drain.frames_lost(now - a.started, self.videos[a.video].frames(a.unit), self.speculation.rate())

    def _fail(self, v: VideoWork, message: str) -> None:
        if v.running:
            v.running = False
            self._out.append(FailVideo(v.key, message))

    def _hung(self, slot: int, reason: str) -> None:
        """A hung actor is killed; the shard it held avoids it from now on."""
        actor = self.fleet.actors[slot]
        a = self.attempts.get(actor.attempt) if actor.attempt is not None else None
        data: dict[str, Any] = {}
        if a is not None and not a.abandoned and a.unit.kind in (Kind.RENDER, Kind.REFINE):
            self.videos[a.video].avoid.setdefault(a.unit.id, set()).add(slot)
            data = {"video": a.video, "shard": a.unit.shard}
        self.fleet.hang(slot, reason, data)

    def _emit(self, kind: EventKind, **data: Any) -> None:
        self._out.append(Emit(kind, data))
