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
from typing import Any

from farm import queues
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
from farm.work import Attempt, UnitState, VideoWork  # noqa: F401 (importable from here)

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
        actor = self._release(a, now)
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
        queues.requeue_orphans(self)
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
                if not queues.steal(self, idle, now) and not queues.speculate(self, idle, now):
                    break
        queues.fill_queues(self, now)

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
