"""A worker node lost mid-job, on a real several-node Ray (``ray.cluster_utils.Cluster``: a head and two
worker nodes on this machine, all on 127.0.0.1): the actors that were on it are replaced on the remaining
node, the shard in flight there is rendered again, and the output equals a fault-free run's, frame for frame.

This module connects to its own cluster (fixture ``own_ray`` stops the session's Ray for the module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from local_nodes import connected_cluster, node_args
from watched import run_watched

from farm.driver import JobRunner
from farm.sample import write_sample

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

FRAMES = 48  # 6 shards of 8


@pytest.fixture(scope="module")
def cluster(own_ray):
    """Head (no CPU: no actor lands there) + two worker nodes with room for two actors each, so the
    actors of a lost node fit on the other. Fast health checks: a killed node is declared dead in ~1 s."""
    with connected_cluster([{"num_cpus": 2}] * 2) as c:
        yield c


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    video, _ = write_sample(str(tmp_path_factory.mktemp("nodes") / "clip.mp4"), frames=FRAMES, width=64, height=48)
    return video


def job(clip: str, out: Path, **params: Any) -> dict:
    return {
        "name": "nodes",
        "inputs": [clip],
        "model": {"name": "synthetic", "params": params},  # the output does not depend on these params
        "window": {"frames": 8},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": 2},
        "retries": 2,
    }


def run(job_dict: dict, on_event=None) -> tuple[Any, JobRunner]:
    return run_watched(job_dict, on_event, "nodes.yaml")


def frames(result) -> list[bytes]:
    (video,) = result.manifest["videos"].values()
    return [p.read_bytes() for p in sorted(Path(video["outputs"]["alpha"]["url"]).glob("*.png"))]


def of(events: list[dict], kind: str, **match: Any) -> list[dict]:
    return [e for e in events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]


def test_worker_node_lost_mid_job(cluster, clip, tmp_path):
    reference, _ = run(job(clip, tmp_path / "ref"))
    assert reference.ok, reference.manifest
    expected = frames(reference)
    assert len(expected) == FRAMES

    nodes: dict[int, str] = {}  # actor slot -> node id
    lost: dict[str, Any] = {}

    def on_event(runner, kind, data):
        if kind == "actor_ready":
            nodes[data["actor"]] = data["node"]
        # Actor 0's first shard is in flight: its node goes, hard (SIGKILL of the node's processes).
        if kind == "shard_dispatched" and data["actor"] == 0 and "node" not in lost:
            lost.update(node=nodes[0], video=data["video"], shard=data["shard"])
            (victim,) = [n for n in cluster.worker_nodes if n.node_id == nodes[0]]
            cluster.remove_node(victim, allow_graceful=False)

    # Actor 0 takes 4 s a shard: its shard is still rendering when its node's loss is detected (~1 s), rather
    # than finishing in a worker process that has not yet noticed that its raylet is gone.
    params = {"sleep_per_frame": 0.05, "slow_actor": 0, "slow_factor": 10}
    result, runner = run(job(clip, tmp_path / "out", **params), on_event)
    assert "node" in lost, "the node was never removed"
    assert result.ok, result.manifest
    assert frames(result) == expected  # none lost, none duplicated, none different

    events = runner.events
    on_lost = sorted(slot for slot, node in nodes.items() if node == lost["node"])
    assert 0 in on_lost
    for slot in on_lost:  # every actor of the lost node got a successor
        assert of(events, "actor_replaced", actor=slot), (slot, [e["event"] for e in events])
    attempts = of(events, "shard_dispatched", video=lost["video"], shard=lost["shard"])
    assert len(attempts) >= 2 and attempts[-1]["attempt"] >= 2, events  # the shard in flight went elsewhere
    assert len(of(events, "shard_done", video=lost["video"], shard=lost["shard"])) == 1
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert lost["node"] not in alive and len(alive) == 2  # the job finished on the head + remaining worker


def test_node_whose_actors_keep_failing_is_blocklisted(cluster, clip, tmp_path):
    """A third node where every render fails (an environment only its processes have): after 3 failed
    shards from its 2 actors the node is blocklisted, its actors are replaced on the healthy nodes
    (which were full until then), and the job finishes with the fault-free output."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reference, _ = run(job(clip, tmp_path / "ref"))
    assert reference.ok, reference.manifest
    bad = cluster.add_node(num_cpus=2, env_vars={"FARM_TEST_BAD_NODE": "1"}, **node_args())
    cluster.wait_for_nodes()

    @ray.remote(num_cpus=2)
    class Blocker:  # fills a healthy node, so the job's first actors can only go to the bad one
        def ready(self) -> bool:
            return True

    blockers = [
        Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
        for n in cluster.worker_nodes
        if n is not bad
    ]
    ray.get([b.ready.remote() for b in blockers])

    def on_event(runner, kind, data):
        if kind == "node_blocklisted":
            for b in blockers:  # make room for the replacements
                ray.kill(b)

    j = job(clip, tmp_path / "out", fail_on_env="FARM_TEST_BAD_NODE")
    j["retries"] = 5
    try:
        result, runner = run(j, on_event)
    finally:
        for b in blockers:
            ray.kill(b)
        cluster.remove_node(bad)
    assert result.ok, result.manifest
    assert frames(result) == frames(reference)
    events = runner.events
    (blocked,) = of(events, "node_blocklisted")
    assert blocked["node"] == bad.node_id and blocked["failures"] >= 3 and blocked["actors"] == 2
    # Both actors were moved to healthy nodes, including one the actor blocklist may have retired first:
    # without the node blocklist each would have been blocklisted, leaving no actor and a failed job.
    assert {e["actor"] for e in of(events, "actor_replaced")} == {0, 1}
    (video,) = result.manifest["videos"]
    done = runner.ledger.done_shards(video)
    assert done and all(rec["worker"]["node"] != bad.node_id for rec in done.values())
