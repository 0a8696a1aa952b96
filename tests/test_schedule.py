"""The scheduler's policy without Ray: a pure state machine fed events, checked on the commands it answers.

Every test drives ``farm.schedule.Scheduler`` with a fake clock and completes or fails the attempts it
dispatches. ``test_runs_with_ray_unimportable`` runs this whole module again in a subprocess where
``import ray`` fails, so the scheduler, its policy and the graph can never come to need Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from farm.events import EventKind
from farm.graph import Kind, build_graph, video_shards
from farm.policy import Failure, determine
from farm.schedule import (
    Cancel,
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
    Scheduler,
    UnitState,
)

CRASH = Failure("InjectedFault: boom")
DIED = Failure("ActorDiedError: gone", actor_died=True)
BAD_INPUT = Failure("bad input", input_error=True)


def units(key: str = "v", frames: int = 48, window: int = 8, overlap: int = 0, mode: str = "none", passes: int = 1,
          channels: tuple[str, ...] = ("alpha",)):
    return build_graph(key, video_shards(key, frames, window, overlap, 0, passes), mode, passes, list(channels))


class Sim:
    """A scheduler with a clock, a record of every command, and helpers to finish what it dispatched."""

    def __init__(self, actors: int = 2, nodes: list[str] | None = None, ready: bool = True, **config: Any) -> None:
        config.setdefault("heartbeat_s", None)
        self.s = Scheduler(Config(**config), actors)
        self.now = 0.0
        self.log: list[Any] = []
        if nodes:
            self.s.on_nodes(set(nodes))
        for k in range(actors if ready else 0):
            self.s.on_actor_ready(k, {"node": nodes[k] if nodes else None})

    def add(self, key: str = "v", frames: int = 48, done: set[str] = frozenset(), **kw: Any) -> None:
        self.s.add_video(key, units(key, frames, **kw), frames, done)

    def step(self, dt: float = 0.0) -> list[Any]:
        self.now += dt
        cmds = self.s.decide(self.now)
        self.log += cmds
        return cmds

    def done(self, cmd: Dispatch | Launch, seconds: float = 1.0) -> None:
        self.s.on_done(cmd.attempt, self.now, seconds)

    def fail(self, cmd: Dispatch | Launch, failure: Failure = CRASH) -> None:
        self.s.on_failed(cmd.attempt, failure, self.now)
        self.log += self.s.pending()

    def open(self) -> list[Dispatch | Launch]:
        """What was dispatched or launched and has not finished, in order."""
        return [c for c in self.log if isinstance(c, (Dispatch, Launch)) and c.attempt in self.s.attempts]

    def events(self, kind: EventKind, **match: Any) -> list[dict]:
        return [c.data for c in self.log
                if isinstance(c, Emit) and c.kind == kind and all(c.data.get(k) == v for k, v in match.items())]

    def prepare_all(self) -> None:
        """Run every prepare the scheduler dispatches first."""
        while True:
            preps = [c for c in self.step() if isinstance(c, Dispatch) and c.unit.kind == Kind.PREPARE]
            if not preps:
                return
            for c in preps:
                self.done(c)

    def run(self, limit: int = 1000) -> list[Any]:
        """Complete everything dispatched, in order, until every video is finished."""
        order = []
        for _ in range(limit):
            self.step(1.0)
            for c in self.open():
                order.append(c)
                self.done(c)
            if self.s.finished:
                return order
        raise AssertionError("the schedule did not finish")


def shards_of(cmds: list[Any]) -> list[Dispatch]:
    return [c for c in cmds if isinstance(c, Dispatch) and c.unit.kind in (Kind.RENDER, Kind.REFINE)]


# ---- graph -------------------------------------------------------------------------------------


def test_graph_of_a_two_pass_model_is_a_dag_not_a_barrier():
    g = {u.id: u for u in units(frames=40, window=12, overlap=4, passes=2, channels=("alpha", "fgr"))}
    assert set(g["refine-0002"].needs) == {"prepare", "shard-0001", "shard-0002", "shard-0003", "refine-0001"}
    assert g["refine-0002"].state_from == "refine-0001" and g["refine-0000"].state_from is None
    assert g["refine-0002"].shard == 7  # the ledger's position: pass 2 follows pass 1's five shards
    assert set(g["blend-0001-fgr"].needs) == {"refine-0001", "refine-0002"}  # only the last pass is blended
    assert len([u for u in g.values() if u.kind == Kind.BLEND]) == 8
    assert set(g["commit-alpha"].needs) >= {f"refine-{k:04d}" for k in range(5)}


# ---- order -------------------------------------------------------------------------------------


def test_prepare_runs_before_any_shard_and_longest_video_first():
    sim = Sim(actors=1)
    sim.add("short", frames=16)
    sim.add("long", frames=48)
    first = sim.step()
    (prep,) = [c for c in first if isinstance(c, Dispatch)]
    assert prep.unit.kind == Kind.PREPARE and prep.video == "short"  # prepares in the order added
    sim.done(prep)
    (prep2,) = [c for c in sim.step() if isinstance(c, Dispatch)]
    assert prep2.unit.kind == Kind.PREPARE and prep2.video == "long"
    sim.done(prep2)
    (shard,) = shards_of(sim.step())
    assert shard.video == "long" and shard.unit.id == "shard-0000"  # most frames left: the critical path


def test_handoff_chain_runs_in_order_one_shard_at_a_time():
    sim = Sim(actors=3)
    sim.add(mode="handoff")
    order = [c.unit.id for c in shards_of(sim.run())]
    assert order == [f"shard-{k:04d}" for k in range(6)]
    assert max(len(shards_of([c])) for c in sim.log) == 1
    g = {u.id: u for u in units(mode="handoff")}
    assert g["shard-0003"].state_from == "shard-0002"


def test_handoff_chain_actor_is_told_its_next_shard_and_gets_it():
    """With prefetch on, dispatching shard k hints shard k+1 to the same actor (it decodes ahead while the
    state is still being made), and when k+1 becomes ready the hinted actor gets it, even when an actor of
    a lower slot is idle too."""
    sim = Sim(actors=2, ready=False, prefetch=True)
    sim.add(mode="handoff")
    sim.s.on_actor_ready(1, {"node": None})  # slot 1 loads first and takes the chain
    sim.prepare_all()
    (first,) = shards_of(sim.log)
    assert first.slot == 1
    sim.s.on_actor_ready(0, {"node": None})  # slot 0 is idle from now on
    sim.run()
    order = shards_of(sim.log)
    hints = [c for c in sim.log if isinstance(c, Prefetch)]
    assert [h.unit.id for h in hints] == [f"shard-{k:04d}" for k in range(1, 6)]
    assert [c.slot for c in order] == [1] * 6, [c.slot for c in order]
    off = Sim(actors=2)
    off.add(mode="handoff")
    off.run()
    assert not [c for c in off.log if isinstance(c, Prefetch)]


def test_stateless_shards_fill_every_idle_actor():
    sim = Sim(actors=3)
    sim.add()
    sim.prepare_all()
    running = shards_of(sim.log)
    assert sorted(c.slot for c in running) == [0, 1, 2]


def test_two_pass_readiness_follows_the_dag():
    sim = Sim(actors=1)
    sim.add(frames=40, window=12, overlap=4, passes=2)
    sim.prepare_all()
    done: list[str] = []
    for _ in range(100):
        sim.step(1.0)
        for c in sim.open():
            if True:
                if c.unit.kind == Kind.REFINE:
                    k = int(c.unit.id.split("-")[1])
                    need = {f"shard-{j:04d}" for j in (k - 1, k, k + 1) if 0 <= j < 5}
                    need |= {f"refine-{k - 1:04d}"} if k else set()
                    assert need <= set(done), (c.unit.id, done)
                done.append(c.unit.id)
                sim.done(c)
        if sim.s.finished:
            break
    assert done.index("shard-0002") < done.index("refine-0001")
    assert done[-1] == "commit-alpha" and len([d for d in done if d.startswith("blend")]) == 4


def test_blends_and_commit_launch_as_their_shards_finish():
    sim = Sim(actors=2)
    sim.add(frames=24, window=12, overlap=4)  # [0,12) [8,20) [16,24)
    sim.prepare_all()
    a, b = shards_of(sim.log)
    sim.done(a)
    assert not [c for c in sim.step() if isinstance(c, Launch)]  # shard 1 not done: no blend yet
    sim.done(b)
    (blend,) = [c for c in sim.step() if isinstance(c, Launch)]
    assert blend.unit.id == "blend-0000-alpha"
    sim.done(blend)
    (last,) = shards_of(sim.log)[2:]
    sim.done(last)
    (blend2,) = [c for c in sim.step() if isinstance(c, Launch)]
    sim.done(blend2)
    cmds = sim.step()
    (commit,) = [c for c in cmds if isinstance(c, Launch)]
    assert commit.unit.kind == Kind.COMMIT
    sim.done(commit)
    assert FinishVideo("v") in sim.step() + sim.s.pending() + sim.log and sim.s.finished


def test_resume_skips_done_units():
    sim = Sim(actors=2)
    sim.add(done={"shard-0000", "shard-0001", "shard-0003"})
    order = [c.unit.id for c in shards_of(sim.run())]
    assert sorted(order) == ["shard-0002", "shard-0004", "shard-0005"]


def test_resume_with_every_shard_done_goes_straight_to_commit():
    sim = Sim(actors=1)
    sim.add(done={f"shard-{k:04d}" for k in range(6)})
    order = sim.run()
    assert [c.unit.kind for c in order] == [Kind.COMMIT]  # no prepare, no shard: only the commit


# ---- failures ----------------------------------------------------------------------------------


def test_failed_shard_is_retried_on_another_actor():
    sim = Sim(actors=2)
    sim.add(frames=8)
    sim.prepare_all()
    (first,) = shards_of(sim.log)
    sim.fail(first)
    (retry,) = shards_of(sim.step())
    assert retry.unit.id == first.unit.id and retry.slot != first.slot and retry.number == 2
    (failed,) = sim.events(EventKind.SHARD_FAILED)
    assert failed["attempt"] == 1 and failed["actor"] == first.slot


def test_avoid_set_waits_for_an_actor_that_has_not_failed_it():
    sim = Sim(actors=2)
    sim.add(frames=16)
    sim.prepare_all()
    a, b = shards_of(sim.log)  # both actors busy
    sim.fail(a)
    assert not shards_of(sim.step())  # only actor a.slot is idle, and it failed this shard
    sim.done(b)
    (retry,) = shards_of(sim.step())
    assert retry.unit.id == a.unit.id and retry.slot == b.slot


def test_any_actor_may_retry_once_every_actor_failed_it():
    sim = Sim(actors=1, retries=3)
    sim.add(frames=8)
    sim.prepare_all()
    (a,) = shards_of(sim.log)
    sim.fail(a)
    (again,) = shards_of(sim.step())
    assert again.slot == a.slot and again.number == 2


def test_input_error_fails_the_video_without_retry():
    sim = Sim(actors=2)
    sim.add(frames=8)
    sim.prepare_all()
    (a,) = shards_of(sim.log)
    sim.fail(a, BAD_INPUT)
    assert FailVideo("v", "bad input") in sim.log
    assert not shards_of(sim.step()) and sim.s.finished


def test_retries_exhausted_fail_the_video():
    sim = Sim(actors=3, retries=1, blocklist_after=10)
    sim.add(frames=8)
    sim.prepare_all()
    (a,) = shards_of(sim.log)
    sim.fail(a)
    (b,) = shards_of(sim.step())
    sim.fail(b)
    assert [c for c in sim.log if isinstance(c, FailVideo)] == [FailVideo("v", CRASH.message)]


def test_actor_death_replaces_it_and_redispatches_without_charging_it():
    sim = Sim(actors=2)
    sim.add(frames=8)
    sim.prepare_all()
    (a,) = shards_of(sim.log)
    sim.fail(a, DIED)
    assert Replace(a.slot, 1) in sim.log and sim.events(EventKind.ACTOR_REPLACED, actor=a.slot, generation=1)
    assert sim.s.blocklists.actor_failures.get(a.slot, 0) == 0
    (retry,) = shards_of(sim.step())
    assert retry.slot != a.slot  # the successor is still loading
    sim.s.on_actor_ready(a.slot, {}, generation=1)
    assert not sim.events(EventKind.ACTOR_READY, actor=a.slot)[1:]  # a successor is not announced again


def test_actor_is_blocklisted_after_n_failures():
    sim = Sim(actors=2, retries=10, blocklist_after=3)
    sim.add(frames=48)
    sim.prepare_all()
    for _ in range(3):
        (bad,) = [c for c in shards_of(sim.log[-4:]) if c.slot == 0] or [None]
        if bad is None:
            break
        sim.fail(bad)
        sim.step()
    (bl,) = sim.events(EventKind.ACTOR_BLOCKLISTED, actor=0)
    assert bl["failures"] == 3 and Kill(0) in sim.log
    cut = len(sim.log)
    sim.run()
    assert not [c for c in shards_of(sim.log[cut:]) if c.slot == 0]


def test_no_healthy_actor_left_fails_the_video_saying_why():
    sim = Sim(actors=1, retries=5, blocklist_after=2)
    sim.add(frames=8)
    sim.prepare_all()
    for _ in range(2):
        (a,) = shards_of(sim.log)[-1:]
        sim.fail(a)
        sim.step()
    (fail,) = [c for c in sim.log if isinstance(c, FailVideo)]
    assert "no healthy actor left" in fail.message and "actor 0: blocklisted after 2 failed shards" in fail.message


def test_node_is_blocklisted_when_its_actors_fail_and_another_node_is_alive():
    sim = Sim(actors=3, nodes=["bad", "bad", "good"], retries=10, blocklist_after=3)
    sim.add(frames=96)
    sim.prepare_all()

    def running_on(slot: int) -> Dispatch:
        (c,) = [c for c in shards_of(sim.log) if c.slot == slot and c.attempt in sim.s.attempts]
        return c

    for slot in (0, 1, 0):  # three failures from two actors of node "bad"
        sim.fail(running_on(slot))
        sim.step()
    (node,) = sim.events(EventKind.NODE_BLOCKLISTED)
    assert node == {"node": "bad", "failures": 3, "actors": 2}
    assert Kill(1) in sim.log  # busy: its shard comes back as a death, and then it is replaced
    sim.fail(running_on(1), DIED)
    sim.step()
    replaced = [c for c in sim.log if isinstance(c, Replace)]
    assert {c.slot for c in replaced} == {0, 1} and all(c.avoid_nodes == {"bad"} for c in replaced)
    assert not sim.events(EventKind.ACTOR_BLOCKLISTED)  # the node's fault, not one actor's


def test_the_only_node_is_never_blocklisted():
    sim = Sim(actors=2, nodes=["solo", "solo"], retries=10, blocklist_after=2)
    sim.add(frames=48)
    sim.prepare_all()
    for _ in range(4):
        live = [c for c in shards_of(sim.log) if c.attempt in sim.s.attempts]
        if not live:
            break
        sim.fail(live[0])
        sim.step()
    assert not sim.events(EventKind.NODE_BLOCKLISTED)


def test_failure_budget_stops_dispatching():
    sim = Sim(actors=1, retries=0, max_failed_shards=0)
    sim.add("a", frames=16)
    sim.add("b", frames=8)
    sim.prepare_all()
    (a,) = shards_of(sim.log)
    sim.fail(a)
    sim.step()
    assert len(shards_of(sim.log)) == 1
    fails = {c.video: c.message for c in sim.log if isinstance(c, FailVideo)}
    assert fails["a"] == CRASH.message and "max_failed_shards=0 exhausted (1 shards failed)" in fails["b"]


def test_determine_is_the_one_place_a_failure_is_judged():
    assert determine(CRASH, Kind.RENDER, attempts=1, retries=2, copies_left=0).retry
    final = determine(CRASH, Kind.RENDER, attempts=3, retries=2, copies_left=0)
    assert final.give_up and final.spend_budget and final.charge_actor
    died = determine(DIED, Kind.RENDER, 1, 2, 0)
    assert died.replace_actor and died.retry and not died.charge_actor
    assert not determine(CRASH, Kind.RENDER, 9, 2, copies_left=1).give_up  # the other copy may still win
    assert determine(DIED, Kind.PREPARE, 1, 2, 0).retry and determine(CRASH, Kind.PREPARE, 1, 2, 0).give_up
    assert determine(CRASH, Kind.COMMIT, 1, 2, 0).give_up
    assert determine(DIED, None, 1, 2, 0) == determine(DIED, None, 1, 2, 0).__class__(replace_actor=True)


# ---- hangs -------------------------------------------------------------------------------------


def test_actors_are_pinged_and_a_silent_one_is_killed_and_replaced():
    sim = Sim(actors=2, heartbeat_s=4.0)
    sim.add(frames=8)
    pings = [c for c in sim.step() if isinstance(c, Ping)]
    assert {p.slot for p in pings} == {0, 1}
    sim.s.on_beat(1, 0, {"call_s": 0.0, "max_call_s": 0.0}, sim.now)  # actor 1 answers; actor 0 never does
    (prep,) = [c for c in sim.log if isinstance(c, Dispatch)]
    sim.done(prep)
    sim.step(5.0)
    (hung,) = sim.events(EventKind.ACTOR_HUNG)
    assert hung["actor"] == 0 and "no heartbeat for 4 s" in hung["reason"]
    assert Kill(0) in sim.log
    busy = [c for c in shards_of(sim.log) if c.slot == 0]
    if busy:  # it held a shard: the death comes back through it, then it is replaced and the shard retried
        sim.fail(busy[0], DIED)
        (retry,) = [c for c in shards_of(sim.step()) if c.unit.id == busy[0].unit.id]
        assert retry.slot != 0
    assert Replace(0, 1) in sim.log


def test_a_render_call_past_the_stall_limit_is_hung():
    sim = Sim(actors=2, heartbeat_s=10.0, stall_s=5.0, speculative=False)
    sim.add(frames=16)
    sim.prepare_all()
    (a, b) = shards_of(sim.log)
    sim.s.on_beat(a.slot, 0, {"call_s": 6.0, "max_call_s": 1.0}, sim.now)
    sim.log += sim.s.pending()
    (hung,) = sim.events(EventKind.ACTOR_HUNG)
    assert hung["shard"] == a.unit.shard and "one render call has run 6 s (limit 5 s)" in hung["reason"]
    sim.fail(a, DIED)
    sim.done(b)
    (retry,) = shards_of(sim.step())
    assert retry.unit.id == a.unit.id and retry.slot == b.slot  # the hung actor's successor is still loading
    assert a.slot in sim.s.videos["v"].avoid[a.unit.id] and Replace(a.slot, 1) in sim.log


# ---- stragglers --------------------------------------------------------------------------------


def straggling() -> tuple[Sim, Dispatch]:
    sim = Sim(actors=2)
    sim.add(frames=24)  # 3 shards
    sim.prepare_all()
    a, b = shards_of(sim.log)
    sim.now += 1.0
    sim.done(b, seconds=2.0)  # a frame in 1/4 s: the median, so 1.5x of it is 3 s for 8 frames
    (c,) = shards_of(sim.step())
    sim.now += 1.0
    sim.done(c, seconds=2.0)
    return sim, a


def test_straggler_is_copied_to_an_idle_actor_at_the_tail():
    sim, slow = straggling()
    assert not shards_of(sim.step())  # running 2 s of the 3 s that would make it late
    (copy,) = shards_of(sim.step(2.0))  # 4 s
    assert copy.copy and copy.unit.id == slow.unit.id and copy.slot != slow.slot and copy.tag == ".copy1"
    assert sim.events(EventKind.SHARD_SPECULATED, shard=slow.unit.shard, actor=copy.slot)
    assert not shards_of(sim.step(10.0))  # one copy per shard


def test_first_result_wins_and_the_other_copy_is_cancelled():
    sim, slow = straggling()
    (copy,) = shards_of(sim.step(12.0))
    sim.done(copy)
    cancels = [c for c in sim.s.pending() if isinstance(c, Cancel)]
    assert cancels == [Cancel(slow.attempt, slow.slot, "v", slow.unit.shard)]
    assert sim.s.videos["v"].state[slow.unit.id] == UnitState.DONE
    sim.done(slow)  # the cancelled copy stops: its actor is free, nothing else happens
    assert sim.s.actors[slow.slot].attempt is None


def test_no_copies_in_handoff_chains_or_when_turned_off():
    sim = Sim(actors=2, speculative=False)
    sim.add(frames=24)
    sim.prepare_all()
    a, b = shards_of(sim.log)
    sim.done(b, seconds=1.0)
    (c,) = shards_of(sim.step(1.0))
    sim.done(c, seconds=1.0)
    assert not shards_of(sim.step(100.0))


# ---- no Ray ------------------------------------------------------------------------------------


# ---- a second shard queued on a busy actor ------------------------------------------------------


def test_busy_actor_gets_a_second_shard_queued_behind_its_first():
    """With queue=2 an actor holds its current shard and the next one (which decodes while it waits and
    starts its model calls when the first one's end); the queued one's running time counts from then."""
    sim = Sim(actors=1, queue=2)
    sim.add(frames=32)  # 4 shards
    sim.prepare_all()
    first, second = shards_of(sim.log)
    assert (first.slot, second.slot) == (0, 0) and [first.unit.id, second.unit.id] == ["shard-0000", "shard-0001"]
    assert sim.s.actors[0].queued == [second.attempt]
    sim.now = 10.0
    sim.done(first)
    assert sim.s.attempts[second.attempt].started == 10.0  # it has the model now
    (third,) = shards_of(sim.step())
    assert third.unit.id == "shard-0002" and third.slot == 0 and sim.s.actors[0].queued == [third.attempt]
    one = Sim(actors=1)  # queue=1: one shard at a time
    one.add(frames=32)
    one.prepare_all()
    assert len(shards_of(one.log)) == 1
    sim.run()
    assert sim.s.finished and not sim.events(EventKind.VIDEO_FAILED)


def test_idle_actor_takes_a_shard_queued_behind_another():
    """No actor idles while another holds a shard it has not begun: the queued call is cancelled and the
    idle actor renders it (first result wins, as a copy)."""
    sim = Sim(actors=2, queue=2)
    sim.add(frames=32)  # 4 shards: 0 and 2 on actor 0, 1 and 3 on actor 1
    sim.prepare_all()
    d = {c.unit.id: c for c in shards_of(sim.log)}
    assert [d[f"shard-{k:04d}"].slot for k in range(4)] == [0, 1, 0, 1]
    sim.done(d["shard-0001"])
    sim.done(d["shard-0003"])  # actor 1 is idle; actor 0 still renders 0 with 2 queued behind it
    cmds = sim.step()
    (cancel,) = [c for c in cmds if isinstance(c, Cancel)]
    (moved,) = shards_of(cmds)
    assert cancel.attempt == d["shard-0002"].attempt and moved.unit.id == "shard-0002" and moved.slot == 1
    assert sim.events(EventKind.SHARD_CANCELLED, shard=2)[0]["reason"] == "moved to an idle actor"
    sim.done(moved)
    sim.fail(d["shard-0002"], Failure("ShardCancelled: cancelled"))  # the queued call stops when it starts
    sim.done(d["shard-0000"])
    sim.run()
    assert sim.s.finished and not sim.events(EventKind.VIDEO_FAILED) and not sim.events(EventKind.SHARD_FAILED)


def test_actor_death_with_a_queued_shard_replaces_it_once_and_retries_both():
    sim = Sim(actors=2, queue=2)
    sim.add(frames=32)
    sim.prepare_all()
    d = {c.unit.id: c for c in shards_of(sim.log)}
    sim.fail(d["shard-0000"], DIED)
    sim.fail(d["shard-0002"], DIED)  # queued on the same actor: its death, not a second one
    replaces = [c for c in sim.log if isinstance(c, Replace)]
    assert [(r.slot, r.generation) for r in replaces] == [(0, 1)]
    assert not shards_of(sim.step())  # actor 1 holds two already; slot 0's successor is loading
    sim.s.on_actor_ready(0, {"node": None}, generation=1)
    retried = shards_of(sim.step())
    assert [(c.unit.id, c.slot) for c in retried] == [("shard-0000", 0), ("shard-0002", 0)]
    sim.run()
    assert sim.s.finished and not sim.events(EventKind.VIDEO_FAILED)


def test_shard_queued_on_a_hung_actor_is_dispatched_again_without_spending_an_attempt():
    sim = Sim(actors=2, queue=2, heartbeat_s=5.0)
    sim.add(frames=32)
    sim.prepare_all()
    d = {c.unit.id: c for c in shards_of(sim.log)}
    assert d["shard-0002"].slot == 0 and sim.s.actors[0].queued == [d["shard-0002"].attempt]
    for _ in range(8):  # actor 1 answers its pings, actor 0 does not
        sim.step(1.0)
        sim.s.on_beat(1, 0, {"call_s": 0.0}, sim.now)
    assert [c.slot for c in sim.log if isinstance(c, Kill)] == [0]
    (note,) = sim.events(EventKind.SHARD_CANCELLED, shard=2)
    assert note["reason"] == "its actor was stopped before the shard began"
    assert sim.s.videos["v"].attempts["shard-0002"] == 0  # not a retry: it never ran
    sim.fail(d["shard-0000"], DIED)  # the hung shard comes back dead: retried, avoiding actor 0
    sim.fail(d["shard-0002"], DIED)  # the queued call comes back with the same death: nothing more
    assert [e["shard"] for e in sim.events(EventKind.SHARD_FAILED)] == [0]
    assert [(r.slot, r.generation) for r in sim.log if isinstance(r, Replace)] == [(0, 1)]
    sim.run()
    assert sim.s.finished and not sim.events(EventKind.VIDEO_FAILED)


def test_runs_with_ray_unimportable():
    """This module and the drain policy's (``test_drain``) again, in a process where ``import ray`` raises: the
    policy needs no Ray at all."""
    if os.environ.get("FARM_TEST_NO_RAY"):
        with pytest.raises(ImportError):
            import ray  # noqa: F401
        return
    code = (
        "import sys; sys.modules['ray'] = None\n"  # import ray -> ImportError
        "import pytest\n"
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(Path(__file__))!r}, "
        f"{str(Path(__file__).with_name('test_drain.py'))!r}]))\n"
    )
    env = {**os.environ, "FARM_TEST_NO_RAY": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
