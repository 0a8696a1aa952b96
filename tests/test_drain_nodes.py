"""A spot node preempted mid-job, on a real several-node Ray: the node is drained through the GCS call the
autoscaler makes on a preemption notice (``DrainNode``, reason ``PREEMPTION``, with a deadline), then
removed (SIGKILL) once the deadline has passed. The output equals a fault-free run's, frame for frame;
with ``scheduler.preemption: drain`` the notice costs fewer frames rendered twice than with ``ignore``. A handoff
chain's shard on the node is checkpointed at a chunk boundary and continued on another node from there.

Every node binds to 127.0.0.1. This module connects to its own cluster (fixture ``own_ray``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from local_nodes import connected_cluster, node_args
from ray.cluster_utils import Cluster
from watched import run_watched

from farm.sample import write_sample

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FRAMES = 192  # 24 shards of 8: 13 s on 3 actors, so the node goes mid-job


def drain_node(node_id: str, deadline_s: float) -> None:
    """What the autoscaler does on a preemption notice (and ``ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N``)."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._private.worker.global_worker.gcs_client
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node_id, reason, "spot preemption (test)", int((time.time() + deadline_s) * 1000))
    assert accepted, why


@pytest.fixture(scope="module")
def cluster(own_ray):
    """Head (no CPU, no ``spot``: no actor lands there) + worker nodes with room for two actors each."""
    with connected_cluster([{"num_cpus": 2, "resources": {"spot": 2}}] * 3) as c:
        yield c


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    video, _ = write_sample(str(tmp_path_factory.mktemp("drain") / "clip.mp4"), frames=FRAMES, width=64, height=48)
    return video


def job(clip: str, out: Path, preemption: str = "drain", **scheduler: Any) -> dict:
    return {
        "name": "drain",
        "inputs": [clip],
        "model": {"name": "synthetic", "params": {"sleep_per_frame": 0.2}},  # 1.6 s a shard
        "window": {"frames": 8},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": 3, "custom": {"spot": 1}},
        "retries": 3,
        "scheduler": {"preemption": preemption, **scheduler},
    }


def frames(result) -> list[bytes]:
    (video,) = result.manifest["videos"].values()
    return [p.read_bytes() for p in sorted(Path(video["outputs"]["alpha"]["url"]).glob("*.png"))]


def of(events: list[dict], kind: str, **match: Any) -> list[dict]:
    return [e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]


def third_on_actor_0(data: dict, done: list) -> bool:
    return data["actor"] == 0 and len(done) >= 3


def preempted(cluster: Cluster, j: dict, notice_s: float,
              when: Callable[[dict, list], bool] = third_on_actor_0) -> tuple[Any, Any, dict]:
    """Run ``j``; once a shard is dispatched ``when`` says (by default: once 3 shards are done, to actor 0), its
    actor's node gets a preemption notice of ``notice_s`` and is removed when it runs out (a worker node is
    added back: the autoscaler's part). ``lost["dispatched"]``: every dispatch with the node of its actor."""
    nodes: dict[int, str] = {}
    lost: dict[str, Any] = {"dispatched": []}
    done = []

    def remove(victim) -> None:
        time.sleep(notice_s)
        cluster.remove_node(victim, allow_graceful=False)
        lost["removed"] = time.monotonic()

    def on_event(runner, kind, data):
        if kind == "actor_ready":
            nodes[data["actor"]] = data["node"]
        if kind == "shard_done":
            done.append(data)
        if kind == "shard_dispatched":
            lost["dispatched"].append({**data, "node": nodes[data["actor"]]})
        if kind == "shard_dispatched" and when(data, done) and "node" not in lost:
            (victim,) = [n for n in cluster.worker_nodes if n.node_id == nodes[data["actor"]]]
            lost.update(node=victim.node_id, shard=data["shard"])
            drain_node(victim.node_id, notice_s)
            lost["thread"] = threading.Thread(target=remove, args=(victim,), daemon=True)
            lost["thread"].start()

    result, runner = run_watched(j, on_event, "drain.yaml")
    assert "node" in lost, "the node was never drained"
    lost["thread"].join(timeout=120)
    cluster.add_node(num_cpus=2, resources={"spot": 2}, **node_args())  # capacity back for the next run
    cluster.wait_for_nodes()
    return result, runner, lost


def test_a_preempted_node_loses_no_work(cluster, clip, tmp_path):
    reference, _ = run_watched(job(clip, tmp_path / "ref"), None, "drain.yaml")
    assert reference.ok, reference.manifest
    expected = frames(reference)
    assert len(expected) == FRAMES

    # A notice of 4 s (2.5 shards' time): what is in flight there finishes in place, nothing new goes there.
    drained, runner, lost = preempted(cluster, job(clip, tmp_path / "drain", drain_min_deadline_s=2), 4.0)
    assert drained.ok, drained.manifest
    assert frames(drained) == expected
    events = runner.events
    (notice,) = of(events, "node_draining")
    assert notice["node"] == lost["node"] and notice["action"] == "drain" and 0 < notice["deadline_s"] <= 4
    t_notice = notice["t"]
    on_node = set(notice["actors"])
    assert 0 in on_node
    for slot in on_node:  # its actors were replaced off the node before it went
        assert [e for e in of(events, "actor_replaced", actor=slot) if e["t"] >= t_notice], slot
    replaced = {e["actor"]: e["t"] for e in of(events, "actor_replaced") if e["t"] >= t_notice}
    for e in of(events, "shard_dispatched"):  # no shard went to an actor on the node after the notice
        if e["t"] > t_notice and e["actor"] in on_node:
            assert e["t"] > replaced[e["actor"]], e
    assert drained.manifest["drained_nodes"] == [lost["node"]]
    drain_waste = drained.manifest["frames_rerendered"]

    # The same notice, ignored: shards keep going to the node until it dies, and what was in flight is redone.
    ignored, runner2, lost2 = preempted(cluster, job(clip, tmp_path / "ignore", preemption="ignore"), 4.0)
    assert ignored.ok, ignored.manifest
    assert frames(ignored) == expected
    assert of(runner2.events, "node_draining")[0]["action"] == "ignore"
    ignore_waste = ignored.manifest["frames_rerendered"]
    assert of(runner2.events, "shard_failed", node_lost=True), runner2.events  # its shard in flight was lost
    assert drain_waste == 0 < ignore_waste, (drain_waste, ignore_waste)


def test_a_short_notice_moves_the_shard_in_flight(cluster, clip, tmp_path):
    """3 s of notice, under ``drain_min_deadline_s`` (10 s): the shard in flight on the node is copied to a
    healthy actor as soon as one is free (actor 0 is slow: 16 s a shard, so its shard is still in flight then);
    the first copy to finish wins, and the output is unchanged."""
    reference, _ = run_watched(job(clip, tmp_path / "ref"), None, "drain.yaml")
    j = job(clip, tmp_path / "out", shards_per_actor=1)  # a dispatch to slow actor 0 after 3 shards triggers
    j["model"]["params"].update(slow_actor=0, slow_factor=10)  # (with a queue it holds its 2nd from the start)
    result, runner, lost = preempted(cluster, j, 3.0)
    assert result.ok, result.manifest
    assert frames(result) == frames(reference)
    (moved,) = of(runner.events, "shard_moved")
    assert moved["node"] == lost["node"] and moved["shard"] == lost["shard"]
    assert len(of(runner.events, "shard_done", shard=lost["shard"])) == 1
    # The original: lost with its node, or cancelled when its copy won before the node's death was seen (a race
    # between the copy's last chunk and Ray's health check; either way it is not rendered a third time).
    failed = of(runner.events, "shard_failed", shard=lost["shard"])
    cancelled = of(runner.events, "shard_cancelled", shard=lost["shard"])
    assert len(failed) + len(cancelled) == 1, (failed, cancelled)
    assert all(f["node_lost"] and f["copy"] for f in failed) and all(c["actor"] == 0 for c in cancelled)


# ---- a handoff chain: the shard in flight on the node is checkpointed and continued elsewhere ----------------

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RVM_WEIGHTS = SHARED / "reference/rvm/rvm_mobilenetv3_random.pth"
CHUNK = 16  # frames per render call (both models' chunk_frames): what a checkpoint may cost at most


def chain_job(clip: str, out: Path, model: dict, frames: int, preemption: str = "drain", **scheduler: Any) -> dict:
    j = job(clip, out, preemption, **scheduler)
    j.update(model=model, window={"frames": frames, "state": "handoff"})
    return j


def second_shard(data: dict, done: list) -> bool:
    return data["shard"] == 1


def check_checkpointed(runner, lost: dict, result, shard_frames: tuple[int, int]) -> None:
    """The shard in flight on the drained node stopped at a chunk boundary inside it, was continued from there on
    an actor off the node, and nothing was rendered twice (no attempt lost)."""
    events = runner.events
    (ckpt,) = of(events, "shard_checkpointed")
    start, stop = shard_frames
    assert ckpt["node"] == lost["node"] and ckpt["shard"] == lost["shard"] == 1, ckpt
    assert start < ckpt["at"] < stop and (ckpt["at"] - start) % CHUNK == 0, ckpt
    after = [d for d in lost["dispatched"] if d["shard"] == 1][1:]  # the continuation
    assert after and all(d["node"] != lost["node"] for d in after), lost["dispatched"]
    assert not of(events, "shard_failed"), of(events, "shard_failed")
    assert result.manifest["frames_rerendered"] <= CHUNK


def test_a_chain_shard_on_a_preempted_node_is_checkpointed_and_continued(cluster, clip, tmp_path):
    """Synthetic chain of 4 shards of 48 frames (7.2 s each), the node running shard 1 preempted with 5 s of
    notice (under drain_min_deadline_s): drain checkpoints the shard and continues it elsewhere; ignore loses it
    with the node and renders it again from its start."""
    model = {"name": "synthetic", "params": {"sleep_per_frame": 0.15}}
    reference, _ = run_watched(chain_job(clip, tmp_path / "ref", model, 48), None, "drain.yaml")
    assert reference.ok, reference.manifest
    expected = frames(reference)
    assert len(expected) == FRAMES

    drained, runner, lost = preempted(cluster, chain_job(clip, tmp_path / "drain", model, 48), 5.0, second_shard)
    assert drained.ok, drained.manifest
    assert frames(drained) == expected
    check_checkpointed(runner, lost, drained, (48, 96))
    drain_waste = drained.manifest["frames_rerendered"]

    ignored, runner2, _ = preempted(cluster, chain_job(clip, tmp_path / "ignore", model, 48, "ignore"), 5.0,
                                    second_shard)
    assert ignored.ok, ignored.manifest
    assert frames(ignored) == expected
    assert not of(runner2.events, "shard_checkpointed")
    (failed,) = of(runner2.events, "shard_failed", node_lost=True)  # the shard in flight, lost with the node
    assert failed["shard"] == 1
    ignore_waste = ignored.manifest["frames_rerendered"]
    assert drain_waste <= CHUNK < ignore_waste, (drain_waste, ignore_waste)


@pytest.mark.skipif(not RVM_WEIGHTS.exists(), reason="../shared reference weights are absent")
def test_an_rvm_chain_checkpointed_on_a_preempted_node_equals_a_fault_free_run(cluster, tmp_path):
    """RVM (tiny random weights), 2 shards of 192 frames handing their recurrent state on: the node running shard
    1 is preempted (8 s of notice, under drain_min_deadline_s=30), the shard checkpoints at a chunk boundary and
    continues on another node from the saved state; the alpha frames are the fault-free run's, byte for byte."""
    rvm_clip, _ = write_sample(str(tmp_path / "rvm.mp4"), frames=384, width=64, height=48)  # ~5 s a shard
    model = {"name": "rvm", "weights": str(RVM_WEIGHTS), "params": {"downsample_ratio": 0.5}}
    reference, _ = run_watched(chain_job(rvm_clip, tmp_path / "ref", model, 192), None, "drain.yaml")
    assert reference.ok, reference.manifest
    drained, runner, lost = preempted(
        cluster, chain_job(rvm_clip, tmp_path / "drain", model, 192, drain_min_deadline_s=30), 8.0, second_shard)
    assert drained.ok, drained.manifest
    assert frames(drained) == frames(reference) and len(frames(reference)) == 384
    check_checkpointed(runner, lost, drained, (192, 384))
