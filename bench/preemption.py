"""Wasted work when a spot node is preempted: frames rendered twice / frames of the job, drain vs ignore.

``python -m bench.preemption [--quick]``. A ``ray.cluster_utils.Cluster`` on this machine (every node on
127.0.0.1): a head without CPUs and three worker nodes with room for two actors each (so the actors of
the lost node fit on the others, the capacity the autoscaler would add). When half of the job's shards
are done, the node of actor 0 gets a preemption notice through the GCS call the autoscaler makes
(``DrainNode``, reason ``PREEMPTION``, deadline ``NOTICE_S``) and is killed at its deadline. The same job
runs with ``scheduler.preemption: drain`` and ``ignore``, side by side. Frames rendered twice are the
driver's count (``frames_rerendered`` in the manifest: each thrown-away attempt's frames, from its running
time and the measured seconds per frame).

A second case is a handoff chain (one shard at a time, each starting from the state the previous one handed
on): when the chain reaches its middle shard, the node running it gets a notice of ``CHAIN_NOTICE_S``. With
drain the shard is checkpointed at its next chunk boundary and continued on another node from there; with
ignore it is lost with the node and rendered again from its start.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

import ray
import yaml

from bench.common import (
    local_cluster,
    local_node_args,
    machine,
    machine_line,
    parse_args,
    sample_clip,
    scratch,
    write_result,
)

NOTICE_S = 2.0  # AWS gives 120 s and GKE ~30 s; scaled down with the job (0.8 s a shard, 4 s left at the notice)
CHAIN_NOTICE_S = 2.5  # a chain's shard takes 3.2 s (64 frames at 0.05 s), its chunks 0.8 s


def drain_node(node_id: str, deadline_s: float) -> None:
    from ray.core.generated import autoscaler_pb2

    gcs = ray._private.worker.global_worker.gcs_client
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node_id, reason, "spot preemption (bench)", int((time.time() + deadline_s) * 1000))
    if not accepted:
        raise RuntimeError(f"drain refused: {why}")


def run_one(cluster: Any, clip: str, frames: int, out: Any, preemption: str, chain: bool = False) -> dict[str, Any]:
    from farm.driver import JobRunner, absolute_local_paths
    from farm.spec import parse_spec

    window = 64 if chain else 8
    job = {
        "name": f"preempt-{preemption}",
        "inputs": [clip],
        "model": {"name": "synthetic", "params": {"sleep_per_frame": 0.05 if chain else 0.1}},
        "window": {"frames": window, "state": "handoff"} if chain else {"frames": window},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": 3, "custom": {"spot": 1}},
        "retries": 3,
        "scheduler": {"preemption": preemption, "drain_min_deadline_s": 1},
    }
    spec = absolute_local_paths(parse_spec(yaml.safe_dump(job), "bench/preemption.yaml"))
    shards = frames // window
    notice_s = CHAIN_NOTICE_S if chain else NOTICE_S
    nodes: dict[int, str] = {}
    state: dict[str, Any] = {"done": 0}

    def preempt(victim: Any) -> None:
        time.sleep(max(0.0, state["notice_at"] + notice_s - time.monotonic()))
        cluster.remove_node(victim, allow_graceful=False)

    def notice(node: str) -> None:
        (victim,) = [n for n in cluster.worker_nodes if n.node_id == node]
        state["actors_on_node"] = sorted(k for k, n in nodes.items() if n == node)
        state["notice_at"] = time.monotonic()
        drain_node(victim.node_id, notice_s)
        state["thread"] = threading.Thread(target=preempt, args=(victim,), daemon=True)
        state["thread"].start()

    def progress(kind: str, data: dict[str, Any]) -> None:
        if kind == "actor_ready":
            nodes[data["actor"]] = data["node"]
        elif kind == "shard_done":
            state["done"] += 1
            if not chain and state["done"] == shards // 2 and "notice_at" not in state:
                notice(nodes[0])  # half the shards done: actor 0's node
        elif kind == "shard_dispatched" and chain and data["shard"] == shards // 2 and "notice_at" not in state:
            notice(nodes[data["actor"]])  # the chain's middle shard: the node running it

    t0 = time.perf_counter()
    runner = JobRunner(spec, progress=progress)
    result = runner.run()
    wall = time.perf_counter() - t0
    state["thread"].join(timeout=300)
    cluster.add_node(**local_node_args(num_cpus=2, resources={"spot": 2}))  # three worker nodes again
    m = result.manifest
    if not result.ok:
        raise RuntimeError(f"{preemption}: the job failed: {m}")
    return {
        "case": "handoff chain" if chain else "stateless",
        "preemption": preemption,
        "frames": frames,
        "checkpoints": [{"shard": e["shard"], "at": e["at"]} for e in runner.events
                        if e["event"] == "shard_checkpointed"],
        "frames_rerendered": m["frames_rerendered"],
        "wasted": round(m["frames_rerendered"] / frames, 4),
        "wall_s": round(wall, 2),
        "drained_nodes": m["drained_nodes"],
        "actors_on_drained_node": state["actors_on_node"],
    }


def main() -> None:
    from farm.pool import ensure_ray

    args = parse_args(__doc__)
    frames = 96 if args.quick else 240
    chain_frames = 128 if args.quick else 256  # shards of 64: the middle one is shard 1 (quick) or 2
    clip, chain_clip = sample_clip(frames), sample_clip(chain_frames)
    out = scratch("preemption")
    runs = []
    health = {"health_check_period_ms": 200, "health_check_failure_threshold": 5}  # a killed node is seen in ~1 s
    cluster = local_cluster({"num_cpus": 0, "include_dashboard": False, "_system_config": health},
                            [{"num_cpus": 2, "resources": {"spot": 2}}] * 3)
    try:
        ensure_ray(cluster.address)
        for chain in (False, True):
            for preemption in ("drain", "ignore"):
                n = chain_frames if chain else frames
                where = out / f"{preemption}{chain:d}"
                r = run_one(cluster, chain_clip if chain else clip, n, where, preemption, chain)
                print(f"{r['case']}, {preemption}: {r['frames_rerendered']} of {n} frames rendered twice "
                      f"({r['wasted']:.1%}), {len(r['checkpoints'])} checkpoint(s), {r['wall_s']} s")
                runs.append(r)  # three worker nodes again: one killed, one added
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    m = machine()
    drain, ignore, chain_drain, chain_ignore = runs
    write_result("preemption", {
        "machine": m,
        "machine_line": machine_line(m),
        "what": f"synthetic model, 0.1 s/frame, {frames} frames in shards of 8, 3 actors on 3 nodes; one node "
                f"gets a {NOTICE_S:g} s preemption notice at 50% of the job and is killed at its deadline. Handoff "
                f"chain: 0.05 s/frame, {chain_frames} frames in shards of 64 (chunks of 16); the node running the "
                f"middle shard gets a {CHAIN_NOTICE_S:g} s notice and is killed at its deadline",
        "baseline": "scheduler.preemption: ignore",
        "runs": runs,
        "summary": {"wasted_drain": drain["wasted"], "wasted_ignore": ignore["wasted"],
                    "chain_wasted_drain": chain_drain["wasted"], "chain_wasted_ignore": chain_ignore["wasted"]},
    }, args.quick)


if __name__ == "__main__":
    main()
