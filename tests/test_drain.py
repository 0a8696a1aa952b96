"""Draining a node before preemption, without Ray: the scheduler is told a node is to be taken and checked on
the commands it answers (``farm.drain``; the same ``Sim`` as ``test_schedule``).

Actor k runs on node ``n{k}``; finished shards of 8 frames in 16 s make the measured rate 2 s per frame.
"""

from __future__ import annotations

import math

from test_schedule import DIED, Sim, shards_of

from farm.drain import Drain, apply_drains
from farm.events import EventKind
from farm.schedule import Cancel, Checkpoint, Dispatch, Kill, Replace

NODES = ["n0", "n1", "n2"]


def started(sim: Sim, **config) -> dict[int, Dispatch]:
    """Three shards in flight (one per actor) from t=0; the ones on actors 1 and 2 finish at t=8 in 16 s each
    (what they reported: 2 s/frame), so actor 0's is expected to need 8 s more (12 s with the margin)."""
    sim.add(frames=64)
    sim.prepare_all()
    first = {c.slot: c for c in shards_of(sim.open())}
    assert sorted(first) == [0, 1, 2]
    sim.now = 8.0
    sim.done(first[1], seconds=16.0)
    sim.done(first[2], seconds=16.0)
    return first


def on(sim: Sim, node: str) -> set[int]:
    return {k for k, n in enumerate(NODES) if n == node}


def test_no_shard_goes_to_a_draining_node_and_its_idle_actor_moves_off_it():
    sim = Sim(actors=3, nodes=NODES, drain_min_deadline_s=5.0)
    first = started(sim)
    sim.done(first[0], seconds=8.0)  # actor 0 idle too
    sim.s.on_node_draining("n0", sim.now + 60, sim.now)
    cmds = sim.step()
    (notice,) = sim.events(EventKind.NODE_DRAINING)
    assert notice == {"node": "n0", "deadline_s": 60.0, "actors": [0], "action": "drain"}
    assert Kill(0) in cmds
    (succ,) = [c for c in cmds if isinstance(c, Replace)]
    assert succ.slot == 0 and "n0" in succ.avoid_nodes  # its successor is placed off the draining node
    assert {c.slot for c in shards_of(cmds)} == {1, 2}  # none to actor 0
    # The successor that Ray placed elsewhere gets work again.
    sim.s.on_actor_ready(0, {"node": "n3"}, generation=1)
    assert 0 in {c.slot for c in shards_of(sim.step())}


def test_a_shard_that_would_not_finish_by_the_deadline_is_copied_at_once_and_the_first_result_wins():
    sim = Sim(actors=3, nodes=NODES, drain_min_deadline_s=5.0)
    first = started(sim)
    sim.s.on_node_draining("n0", sim.now + 10, sim.now)  # 10 s of notice, 12 s needed
    cmds = sim.step()
    copies = [c for c in shards_of(cmds) if c.copy]
    assert len(copies) == 1 and copies[0].unit.id == first[0].unit.id and copies[0].slot in (1, 2)
    assert copies[0].tag  # its parts never overwrite the original's
    (moved,) = sim.events(EventKind.SHARD_MOVED)
    assert moved["node"] == "n0" and moved["actor"] == 0 and moved["to"] == copies[0].slot
    assert cmds.index(copies[0]) < min(cmds.index(c) for c in shards_of(cmds) if not c.copy)  # before new work
    sim.now = 10.0
    sim.done(copies[0], seconds=8.0)  # the copy wins: the original on the draining node is cancelled
    cancel = [c for c in sim.step() if isinstance(c, Cancel)]
    assert [c.attempt for c in cancel] == [first[0].attempt]
    (cancelled,) = sim.events(EventKind.SHARD_CANCELLED)
    assert cancelled["frames_lost"] == 5  # it ran 10 s at 2 s/frame: 5 of its frames were rendered twice


def test_original_lost_with_its_node_is_not_retried_while_its_copy_runs():
    sim = Sim(actors=3, nodes=NODES, drain_min_deadline_s=5.0)
    first = started(sim)
    sim.s.on_node_draining("n0", sim.now + 1, sim.now)  # 1 s: under drain_min_deadline_s
    copy = next(c for c in shards_of(sim.step()) if c.copy)
    sim.now = 9.5
    sim.s.on_nodes({"n1", "n2"})  # the node went at its deadline
    sim.fail(first[0], DIED)
    (failed,) = sim.events(EventKind.SHARD_FAILED)
    assert failed["node_lost"] and failed["copy"] and failed["frames_lost"] == 4
    assert not [c for c in shards_of(sim.step()) if c.unit.id == first[0].unit.id]  # no retry: the copy runs
    sim.done(copy, seconds=8.0)
    sim.run()
    assert sim.s.finished and not any(isinstance(c, Cancel) for c in sim.log)


def test_a_shard_finishes_in_place_when_the_deadline_leaves_time():
    sim = Sim(actors=3, nodes=NODES, drain_min_deadline_s=5.0)
    first = started(sim)
    sim.s.on_node_draining("n0", sim.now + 13, sim.now)  # 12 s needed with the margin
    assert not [c for c in shards_of(sim.step()) if c.copy]
    assert not sim.events(EventKind.SHARD_MOVED)
    sim.done(first[0], seconds=8.0)
    cmds = sim.step()
    assert Kill(0) in cmds and all(c.slot != 0 for c in shards_of(cmds))  # then its actor moves off the node


def test_a_shard_that_slows_down_is_copied_once_the_deadline_gets_too_close():
    sim = Sim(actors=3, nodes=NODES, drain_min_deadline_s=5.0)
    started(sim)
    sim.s.on_node_draining("n0", sim.now + 13, sim.now)  # 12 s needed, 13 s left: in place
    others = shards_of(sim.step())
    assert [c.slot for c in others] == [1, 2] and not any(c.copy for c in others)
    sim.now = 17.0  # 9 s later still running, and 4 s left: under the minimum notice
    for c in others:
        sim.done(c, seconds=16.0)
    (copy,) = [c for c in shards_of(sim.step()) if c.copy]
    assert copy.slot in (1, 2)


def test_ignore_logs_the_notice_and_keeps_dispatching_there():
    sim = Sim(actors=3, nodes=NODES, preemption="ignore")
    first = started(sim)
    sim.done(first[0], seconds=8.0)
    sim.s.on_node_draining("n0", sim.now + 1, sim.now)
    cmds = sim.step()
    assert sim.events(EventKind.NODE_DRAINING)[0]["action"] == "ignore"
    assert 0 in {c.slot for c in shards_of(cmds)} and Kill(0) not in cmds
    lost = next(c for c in shards_of(cmds) if c.slot == 0)
    sim.now = 12.0
    sim.s.on_nodes({"n1", "n2"})
    sim.fail(lost, DIED)  # the node went: the shard is redone from its start elsewhere
    (failed,) = sim.events(EventKind.SHARD_FAILED)
    assert failed["node_lost"] and failed["frames_lost"] == 2 and failed["attempt"] == 1  # 4 s at 2 s/frame
    for c in shards_of(cmds):
        if c.slot != 0:
            sim.done(c, seconds=16.0)
    assert any(c.unit.id == lost.unit.id and c.number == 2 for c in shards_of(sim.step()))


def test_handoff_chain_shard_is_not_copied_but_gets_no_successor_on_the_node():
    sim = Sim(actors=2, nodes=NODES[:2], speculative=False, handoff=True)
    sim.add(frames=32, mode="handoff")
    sim.prepare_all()
    (first,) = shards_of(sim.open())  # a chain: one shard at a time
    sim.s.on_node_draining(NODES[first.slot], sim.now + 1, sim.now)
    sim.step()
    assert not sim.events(EventKind.SHARD_MOVED)
    sim.done(first, seconds=8.0)
    (nxt,) = shards_of(sim.step())
    assert nxt.slot != first.slot  # the chain goes on off the draining node


def chain_started(**config) -> tuple[Sim, Dispatch]:
    """A handoff chain (one shard at a time) on two actors, its first shard in flight."""
    sim = Sim(actors=2, nodes=NODES[:2], speculative=False, handoff=True, drain_min_deadline_s=5.0, **config)
    sim.add(frames=32, mode="handoff")
    sim.prepare_all()
    (first,) = shards_of(sim.open())
    return sim, first


def test_a_chain_shard_that_would_not_finish_is_checkpointed_once_and_continues_elsewhere():
    sim, first = chain_started()
    node = NODES[first.slot]
    sim.s.on_node_draining(node, sim.now + 1, sim.now)  # 1 s: under drain_min_deadline_s
    (ask,) = [c for c in sim.step() if isinstance(c, Checkpoint)]
    assert ask == Checkpoint(first.attempt, first.slot, "v", first.unit.shard)
    assert not [c for c in sim.step(0.5) if isinstance(c, (Checkpoint, Dispatch))]  # asked once; nothing else to do
    sim.s.on_checkpointed(first.attempt, 8, sim.now)  # it stopped at frame 8 with its state there
    cmds = sim.step()
    (moved,) = shards_of(cmds)
    assert moved.unit.id == first.unit.id and moved.slot != first.slot and not moved.copy
    assert moved.number == first.number  # a checkpoint is not a failure: no retry spent
    assert Kill(first.slot) in cmds  # its actor, idle on the draining node, moves off it
    (ckpt,) = sim.events(EventKind.SHARD_CHECKPOINTED)
    assert ckpt == {"video": "v", "shard": 0, "actor": first.slot, "node": node, "at": 8, "frames_lost": 0}
    assert not sim.events(EventKind.SHARD_FAILED) and not sim.events(EventKind.SHARD_MOVED)
    sim.run()
    assert sim.s.finished


def test_a_chain_shard_that_finishes_in_time_is_not_checkpointed():
    sim, first = chain_started()
    sim.done(first, seconds=16.0)  # 2 s a frame measured
    (second,) = shards_of(sim.step())
    sim.s.on_node_draining(NODES[second.slot], sim.now + 60, sim.now)  # 24 s needed with the margin
    assert not [c for c in sim.step(1.0) if isinstance(c, Checkpoint)]


def test_ignore_never_checkpoints_and_a_node_lost_first_redoes_the_shard():
    sim, first = chain_started(preemption="ignore")
    sim.s.on_node_draining(NODES[first.slot], sim.now + 1, sim.now)
    assert not [c for c in sim.step() if isinstance(c, Checkpoint)]
    # With drain too: a node that goes before the checkpoint lands loses the attempt, redone from its start.
    sim, first = chain_started()
    sim.s.on_node_draining(NODES[first.slot], sim.now + 1, sim.now)
    assert [c for c in sim.step() if isinstance(c, Checkpoint)]
    sim.now = 2.0
    sim.s.on_nodes({n for n in NODES[:2] if n != NODES[first.slot]})
    sim.fail(first, DIED)
    (failed,) = sim.events(EventKind.SHARD_FAILED)
    assert failed["node_lost"] and not sim.events(EventKind.SHARD_CHECKPOINTED)
    (retry,) = shards_of(sim.step())
    assert retry.unit.id == first.unit.id and retry.number == 2 and retry.slot != first.slot


def test_a_withdrawn_drain_gives_the_node_work_again():
    sim = Sim(actors=2, nodes=NODES[:2])
    sim.add(frames=64)
    sim.prepare_all()
    for c in sim.open():
        sim.done(c, seconds=16.0)
    sim.s.on_node_draining("n0", math.inf, sim.now)
    assert Kill(0) in sim.step() and sim.events(EventKind.NODE_DRAINING)[0]["deadline_s"] is None
    sim.s.on_node_undrained("n0")
    sim.s.on_actor_ready(0, {"node": "n0"}, generation=1)  # its successor landed there before the notice went
    assert 0 in {c.slot for c in shards_of(sim.step())}
    assert sim.s.drain.drained == ["n0"]  # the report still names it


def test_frames_lost_estimate():
    assert Drain.frames_lost(3.5, 8, 1.0) == 3
    assert Drain.frames_lost(30.0, 8, 1.0) == 8
    assert Drain.frames_lost(1.0, 8, None) == 8  # no rate measured yet: the whole shard, the most it cost
    d = Drain(True, 10.0)
    assert d.finishes_in_place(0.0, math.inf, 0.0, 8, None)  # no deadline given
    assert not d.finishes_in_place(0.0, 9.0, 0.0, 1, 0.1)  # under the minimum notice
    assert d.finishes_in_place(0.0, 20.0, 0.0, 8, 1.0) and not d.finishes_in_place(0.0, 11.0, 0.0, 8, 1.0)


def test_a_poll_of_the_draining_nodes():
    sim = Sim(actors=2, nodes=NODES[:2])
    apply_drains(sim.s, None, 0.0, lambda: set(NODES))  # the GCS did not answer: nothing changes
    apply_drains(sim.s, {"n0": 30.0}, 5.0, lambda: set(NODES))
    apply_drains(sim.s, {"n0": 29.0}, 6.0, lambda: set(NODES))  # the same notice again: one event
    assert sim.s.drain.nodes == {"n0": 35.0} and len(sim.events(EventKind.NODE_DRAINING)) == 0
    sim.step()
    assert len(sim.events(EventKind.NODE_DRAINING)) == 1
    apply_drains(sim.s, {}, 7.0, lambda: {"n1"})  # n0 went: it stays drained, and is asked about no more
    assert sim.s.fleet.draining == {"n0"} and sim.s.drain.gone == {"n0"}


def test_the_report_names_the_drained_nodes_and_counts_frames_rendered_twice():
    from farm.events import EventLog
    from farm.report import RunCounts, summary_line

    log, counts = EventLog(), RunCounts()
    log.subscribe(counts.on_event)
    log.publish(EventKind.NODE_DRAINING, node="n0", deadline_s=30.0, actors=[0], action="drain")
    log.publish(EventKind.SHARD_CANCELLED, video="v", shard=2, actor=1, reason="another copy finished first",
                frames_lost=5)
    log.publish(EventKind.SHARD_FAILED, video="v", shard=3, actor=0, attempt=1, error="gone", node_lost=True,
                frames_lost=3)
    assert counts.drained == ["n0"] and counts.rerendered == {"v": 8}
    manifest = {"videos": {"v": {"status": "succeeded", "frames": 64}}, "seconds": 3.0,
                "drained_nodes": counts.drained, "frames_rerendered": 8}
    assert summary_line(manifest).endswith("; 1 node(s) drained (n0), 8 frames rendered again")


def test_a_shard_queued_on_a_draining_node_goes_to_a_healthy_actor_without_spending_an_attempt():
    sim = Sim(actors=3, nodes=NODES, drain_min_deadline_s=5.0, queue=2)
    sim.add(frames=64)
    sim.prepare_all()
    queued = sim.s.actors[0].queued
    assert len(queued) == 1  # actor 0 holds a shard and one queued behind it
    waiting = sim.s.attempts[queued[0]]
    sim.s.on_node_draining("n0", sim.now + 60, sim.now)  # time enough for the one it renders
    cmds = sim.step()
    assert Cancel(waiting.id, 0, "v", waiting.unit.shard) in cmds
    (note,) = sim.events(EventKind.SHARD_CANCELLED, shard=waiting.unit.shard)
    assert note["reason"] == "its node is draining"
    assert sim.s.videos["v"].attempts[waiting.unit.id] == 0  # it never began: no attempt spent
    sim.s.on_failed(waiting.id, DIED, sim.now)  # the cancelled call comes back: nothing more
    for c in [c for c in sim.open() if c.slot in (1, 2)]:
        sim.done(c)
    again = [c for c in shards_of(sim.step()) if c.unit.id == waiting.unit.id]
    assert again and again[0].slot in (1, 2)
    sim.run()
    assert sim.s.finished and not sim.events(EventKind.SHARD_FAILED)
