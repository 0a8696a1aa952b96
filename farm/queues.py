"""Beyond one shard per idle actor: shards queued behind busy actors' current ones
(``Config.queue``), queued shards an idle actor takes over or that a killed actor leaves behind, and
straggler copies at the tail. Pure rules over the scheduler's state (``farm.schedule``), no Ray.
"""

from __future__ import annotations

from typing import Any

from farm.events import EventKind
from farm.work import UnitState

Scheduler = Any  # farm.schedule.Scheduler (which imports this module)


def requeue_orphans(s: Scheduler) -> None:
    """Shards queued on an actor that was killed (hung, blocklisted) before they began: ready again,
    spending none of their attempts (their death, when it comes back, is an abandoned copy's)."""
    while s.fleet.orphans:
        a = s.attempts.get(s.fleet.orphans.pop(0))
        if a is None or a.abandoned:
            continue
        a.abandoned = True
        _back_to_ready(s, a)
        s._emit(EventKind.SHARD_CANCELLED, video=a.video, shard=a.unit.shard, actor=a.slot,
                reason="its actor was stopped before the shard began")


def release(s: Scheduler, attempt: int, now: float, reason: str) -> None:
    """Cancel a shard queued on an actor that must not begin it (its node is draining): ready again for
    another actor, spending none of its attempts."""
    a = s.attempts[attempt]
    if not a.abandoned:
        s._cancel(attempt, now, reason=reason)
        _back_to_ready(s, a)


def _back_to_ready(s: Scheduler, a: Any) -> None:
    v, uid = s.videos[a.video], a.unit.id
    copies = v.copies.get(uid, [])
    if a.id in copies:
        copies.remove(a.id)
    if not copies:
        v.copies.pop(uid, None)
        if not a.copy:
            v.attempts[uid] -= 1
        if v.running and v.state[uid] == UnitState.RUNNING:
            v.make_ready(uid)


def fill_queues(s: Scheduler, now: float) -> None:
    """Ready shards behind busy actors' current ones (``Config.queue`` > 1): an actor's next model calls
    then start as soon as its current shard's last call ends, while that shard's encoders finish."""
    while not s.budget.exhausted:
        slots = s.fleet.queueable()
        for uid, v in s._ready():
            fresh = [k for k in slots if k not in v.avoid.get(uid, set())]
            if fresh:  # the actor decoding it already, else the one whose current shard started first
                fresh.sort(key=lambda k: (s.hinted.get(k) != (v.key, uid), _started(s, k)))
                s._dispatch(fresh[0], v, uid, now)
                break
        else:
            return

def _started(s: Scheduler, slot: int) -> float:
    attempt = s.fleet.actors[slot].attempt
    return s.attempts[attempt].started if attempt in s.attempts else 0.0

def steal(s: Scheduler, idle: list[int], now: float) -> bool:
    """An idle actor takes a shard queued behind another actor's current one (not started there): that
    queued call is cancelled, so no actor idles while another holds work it has not begun."""
    for actor in s.fleet.actors:
        for attempt in actor.queued:
            a = s.attempts[attempt]
            v = s.videos[a.video]
            free = [k for k in idle if k not in v.avoid.get(a.unit.id, set())]
            if a.abandoned or not v.running or not free:
                continue
            v.copies[a.unit.id].remove(attempt)
            s._cancel(attempt, now, reason="moved to an idle actor")
            s._dispatch(free[0], v, a.unit.id, now, moved_from=a.slot)
            return True
    return False

def speculate(s: Scheduler, idle: list[int], now: float) -> bool:
    """At the tail (nothing else to run), copy the slowest straggler to an idle actor."""
    if not s.speculation.active():
        return False
    best = None
    for v in s.running():
        for uid, ids in v.copies.items():
            if len(ids) != 1 or (v.key, uid) in s.speculation.copied:
                continue
            a = s.attempts[ids[0]]
            late = s.speculation.lateness(now - a.started, v.frames(a.unit))
            free = [k for k in idle if k not in v.avoid.get(uid, set())]
            if late > 1 and free and (best is None or late > best[0]):
                best = (late, v, uid, free[0])
    if best is None:
        return False
    _, v, uid, slot = best
    s.speculation.copied.add((v.key, uid))
    s._dispatch(slot, v, uid, now, copy=True)
    return True
