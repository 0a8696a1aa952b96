"""What the scheduler does when a node is about to be taken (a spot or preemptible node's notice).

Ray turns a cloud's warning into a drain request (``DrainNode``, reason ``PREEMPTION``, with a deadline);
the pool reads the draining nodes from the GCS and the scheduler is told ``on_node_draining(node,
deadline)``. With ``scheduler.preemption: drain`` (the default) farm then:

- dispatches no new shard to the node's actors, and starts no successor there (``Replace.avoid_nodes``,
  as for a blocklisted node); the node's idle actors are stopped and replaced off it at once, so the
  job's capacity is back (on a pending actor the autoscaler adds a node) before the node goes; a shard
  queued on one of its actors and not begun is cancelled and is ready again (``queues.release``);
- lets a stateless shard in flight there finish in place when the deadline leaves time for it (from
  the measured seconds per frame, with a margin, and never under ``drain_min_deadline_s``), and
  otherwise copies it to a healthy actor at once: the first result wins (the speculation machinery);
- asks a handoff chain's shard in flight there (never copied: its output depends on the state it was
  given) that would not finish by the deadline to checkpoint, once (``Checkpoint``): the actor stops at
  its next chunk boundary k inside the shard's core and returns a partial record (frames up to k, the
  state at k, in the ledger); ``Scheduler.on_checkpointed`` makes the shard ready again, and it continues
  from k on a healthy actor (no retry spent, nothing rendered twice: ``shard_checkpointed``). If the node
  goes first, the attempt is lost as on any node loss and redone from the state it started from.

With ``preemption: ignore`` the notice is only logged: the node's work is lost when it goes.
Pure: no Ray, no clock of its own (``now`` and the deadline are on the scheduler's clock).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from farm import queues
from farm.commands import Checkpoint
from farm.events import EventKind
from farm.fleet import ActorState
from farm.graph import Kind
from farm.work import Attempt

Scheduler = Any  # farm.schedule.Scheduler (which imports this module)

FINISH_MARGIN = 1.5  # a shard finishes in place only if 1.5x its expected time left fits before the deadline


@dataclass
class Drain:
    enabled: bool  # scheduler.preemption == "drain"
    min_deadline_s: float  # under this much notice farm does not try to finish in place
    handoff: bool = False  # the job's shards hand state down a chain: never copied
    nodes: dict[str, float] = field(default_factory=dict)  # draining node -> its deadline (inf: none given)
    drained: list[str] = field(default_factory=list)  # every node that got a notice, in order (the report)
    moved: set[tuple[str, str]] = field(default_factory=set)  # (video, unit) copied off a draining node
    gone: set[str] = field(default_factory=set)  # drained nodes that have gone
    checkpointing: set[int] = field(default_factory=set)  # attempts asked to checkpoint (asked once)

    # ---- what the pool reports ---------------------------------------------------------------

    def notice(self, s: Scheduler, node: str, deadline: float, now: float) -> None:
        if node in self.nodes:
            self.nodes[node] = deadline
            return
        self.nodes[node] = deadline
        if node not in self.drained:
            self.drained.append(node)
        actors = sorted(a.slot for a in s.fleet.actors if a.node == node and a.state != ActorState.GONE)
        left = None if math.isinf(deadline) else round(deadline - now, 3)
        s._emit(EventKind.NODE_DRAINING, node=node, deadline_s=left, actors=actors,
                action="drain" if self.enabled else "ignore")
        if self.enabled:
            s.fleet.draining.add(node)

    def lift(self, s: Scheduler, node: str) -> None:
        """The node is no longer draining (the request was withdrawn): it gets work again."""
        self.nodes.pop(node, None)
        s.fleet.draining.discard(node)

    # ---- decisions (each ``decide``, before the ready shards are dispatched) -----------------

    def step(self, s: Scheduler, now: float) -> None:
        if not self.enabled or not s.fleet.draining:
            return
        for a in s.fleet.actors:  # idle on a draining node: stop it, its successor starts elsewhere
            if a.node in s.fleet.draining and a.state == ActorState.IDLE:
                s.fleet.kill(a.slot)
                s.fleet.replace(a.slot)
            elif a.node in s.fleet.draining:  # queued behind its current shard, not begun: to a healthy actor
                for attempt in list(a.queued):
                    queues.release(s, attempt, now, "its node is draining")
        if self.handoff:
            self._checkpoint(s, now)
            return
        for attempt in sorted(s.attempts.values(), key=lambda a: a.started):
            if self._must_move(s, attempt, now):
                if not self._move(s, attempt, now):
                    return  # no healthy idle actor now: the next decide tries again

    def _must_move(self, s: Scheduler, a: Attempt, now: float) -> bool:
        if not self._at_risk(s, a, now, (Kind.RENDER, Kind.REFINE)):
            return False
        v = s.videos[a.video]
        return (v.key, a.unit.id) not in self.moved and len(v.copies.get(a.unit.id, [])) == 1

    def _at_risk(self, s: Scheduler, a: Attempt, now: float, kinds: tuple[Kind, ...]) -> bool:
        """Whether ``a`` runs on a draining node and is not expected to finish there before the deadline."""
        if a.slot is None or a.abandoned or a.unit.kind not in kinds:
            return False
        node = s.fleet.actors[a.slot].node
        if node not in s.fleet.draining:
            return False
        v = s.videos[a.video]
        if not v.running:
            return False
        return not self.finishes_in_place(now, self.nodes[node], now - a.started, v.frames(a.unit),
                                          s.speculation.rate())

    def finishes_in_place(self, now: float, deadline: float, running_s: float, frames: int,
                          per_frame: float | None) -> bool:
        """Whether a shard in flight on a draining node is expected to finish before the deadline."""
        left = deadline - now
        if math.isinf(left):
            return True
        if left < self.min_deadline_s or per_frame is None:
            return False
        return FINISH_MARGIN * max(per_frame * frames - running_s, 0.0) <= left

    def _move(self, s: Scheduler, a: Attempt, now: float) -> bool:
        v = s.videos[a.video]
        avoid = v.avoid.get(a.unit.id, set())
        free = [k for k in s.fleet.idle() if k not in avoid]
        if not free:
            return False
        self.moved.add((v.key, a.unit.id))
        s.speculation.copied.add((v.key, a.unit.id))  # its one copy: the tail's speculation adds none
        node = s.fleet.actors[a.slot].node if a.slot is not None else None
        s._emit(EventKind.SHARD_MOVED, video=v.key, shard=a.unit.shard, node=node, actor=a.slot, to=free[0])
        s._dispatch(free[0], v, a.unit.id, now, copy=True)
        return True

    def _checkpoint(self, s: Scheduler, now: float) -> None:
        """A handoff chain's shard on a draining node that would not finish by the deadline is asked, once,
        to stop at its next chunk boundary and save its state (``Checkpoint``); the chain goes on elsewhere."""
        for a in sorted(s.attempts.values(), key=lambda a: a.started):
            if a.id not in self.checkpointing and self._at_risk(s, a, now, (Kind.RENDER,)):
                self.checkpointing.add(a.id)
                s._out.append(Checkpoint(a.id, a.slot, a.video, a.unit.shard))

    def checkpointed(self, s: Scheduler, a: Attempt, node: str | None, at: int, frames_lost: int) -> None:
        """A checkpointed attempt came back with its partial record: the shard is ready again, to continue
        from frame ``at``. A checkpoint is not a failure: it spends none of the shard's retries."""
        v, uid = s.videos[a.video], a.unit.id
        self.checkpointing.discard(a.id)
        v.attempts[uid] = max(v.attempts.get(uid, 1) - 1, 0)
        s._emit(EventKind.SHARD_CHECKPOINTED, video=v.key, shard=a.unit.shard, actor=a.slot, node=node, at=at,
                frames_lost=frames_lost)
        if v.running:
            v.make_ready(uid)

    # ---- accounting --------------------------------------------------------------------------

    @staticmethod
    def frames_lost(running_s: float, frames: int, per_frame: float | None) -> int:
        """Frames an attempt that is thrown away had rendered, from the measured seconds per frame (all
        of its frames while no shard has finished yet: the most it can have cost)."""
        if per_frame is None or per_frame <= 0:
            return frames
        return min(frames, int(running_s / per_frame))


def apply_drains(s: Scheduler, draining: dict[str, float] | None, now: float,
                 alive_nodes: Callable[[], set[str]]) -> None:
    """Tell the scheduler what a poll of the draining nodes found (``Pool.draining_nodes``: node -> seconds
    to its deadline; None when the GCS did not answer, and the next poll asks again)."""
    if draining is None:
        return
    for node, left_s in draining.items():
        if node not in s.drain.nodes:
            s.on_node_draining(node, now + left_s, now)
    lifted = [n for n in s.drain.nodes if n not in draining and n not in s.drain.gone]
    if lifted:  # no longer listed: withdrawn if the node is still up (a node that went leaves the list too)
        alive = alive_nodes()
        for node in lifted:
            if node in alive:
                s.on_node_undrained(node)
            else:
                s.drain.gone.add(node)
