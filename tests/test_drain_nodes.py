"""A spot node preempted mid-job, on a real several-node Ray: the node is drained through the GCS call the
autoscaler makes on a preemption notice (``DrainNode``, reason ``PREEMPTION``, with a deadline), then
removed (SIGKILL) once the deadline has passed. The output equals a fault-free run's, frame for frame;
with ``scheduler.preemption: drain`` the notice costs fewer frames rendered twice than with ``ignore``.

Every node binds to 127.0.0.1. This module connects to its own cluster (fixture ``own_ray``).
"""

from __future__ import annotations

import threading
import time
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


def preempted(cluster: Cluster, j: dict, notice_s: float) -> tuple[Any, Any, dict]:
    """Run ``j``; once 3 shards are done and actor 0 has a shard in flight, its node gets a preemption notice
    of ``notice_s`` and is removed when it runs out (a worker node is added back: the autoscaler's part)."""
    nodes: dict[int, str] = {}
    lost: dict[str, Any] = {}
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
        if kind == "shard_dispatched" and data["actor"] == 0 and len(done) >= 3 and "node" not in lost:
            (victim,) = [n for n in cluster.worker_nodes if n.node_id == nodes[0]]
            lost.update(node=nodes[0], shard=data["shard"])
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
    j = job(clip, tmp_path / "out")
    j["model"]["params"].update(slow_actor=0, slow_factor=10)
    result, runner, lost = preempted(cluster, j, 3.0)
    assert result.ok, result.manifest
    assert frames(result) == frames(reference)
    (moved,) = of(runner.events, "shard_moved")
    assert moved["node"] == lost["node"] and moved["shard"] == lost["shard"]
    assert len(of(runner.events, "shard_done", shard=lost["shard"])) == 1
    (failed,) = of(runner.events, "shard_failed", shard=lost["shard"])  # the original, lost with its node
    assert failed["node_lost"] and failed["copy"]
