"""Wasted work when a spot node is preempted: frames rendered twice / frames of the job, drain vs ignore.

``python -m bench.preemption [--quick]``. A ``ray.cluster_utils.Cluster`` on this machine (every node on
127.0.0.1): a head without CPUs and three worker nodes with room for two actors each (so the actors of
the lost node fit on the others, the capacity the autoscaler would add). When half of the job's shards
are done, the node of actor 0 gets a preemption notice through the GCS call the autoscaler makes
(``DrainNode``, reason ``PREEMPTION``, deadline ``NOTICE_S``) and is killed at its deadline. The same job
runs with ``scheduler.preemption: drain`` and ``ignore``, side by side. Frames rendered twice are the
driver's count (``frames_rerendered`` in the manifest: each thrown-away attempt's frames, from its running
time and the measured seconds per frame).
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


def drain_node(node_id: str, deadline_s: float) -> None:
    from ray.core.generated import autoscaler_pb2

    gcs = ray._private.worker.global_worker.gcs_client
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node_id, reason, "spot preemption (bench)", int((time.time() + deadline_s) * 1000))
    if not accepted:
        raise RuntimeError(f"drain refused: {why}")


def run_one(cluster: Any, clip: str, frames: int, out: Any, preemption: str) -> dict[str, Any]:
    from farm.driver import JobRunner, absolute_local_paths
    from farm.spec import parse_spec

    job = {
        "name": f"preempt-{preemption}",
        "inputs": [clip],
        "model": {"name": "synthetic", "params": {"sleep_per_frame": 0.1}},
        "window": {"frames": 8},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": 3, "custom": {"spot": 1}},
        "retries": 3,
        "scheduler": {"preemption": preemption, "drain_min_deadline_s": 1},
    }
    spec = absolute_local_paths(parse_spec(yaml.safe_dump(job), "bench/preemption.yaml"))
    shards = frames // 8
    nodes: dict[int, str] = {}
    state: dict[str, Any] = {"done": 0}

    def preempt(victim: Any) -> None:
        time.sleep(max(0.0, state["notice_at"] + NOTICE_S - time.monotonic()))
        cluster.remove_node(victim, allow_graceful=False)

    def progress(kind: str, data: dict[str, Any]) -> None:
        if kind == "actor_ready":
            nodes[data["actor"]] = data["node"]
        elif kind == "shard_done":
            state["done"] += 1
            if state["done"] == shards // 2 and "notice_at" not in state:
                (victim,) = [n for n in cluster.worker_nodes if n.node_id == nodes[0]]
                state["actors_on_node"] = sorted(k for k, n in nodes.items() if n == nodes[0])
                state["notice_at"] = time.monotonic()
                drain_node(victim.node_id, NOTICE_S)
                state["thread"] = threading.Thread(target=preempt, args=(victim,), daemon=True)
                state["thread"].start()

    t0 = time.perf_counter()
    result = JobRunner(spec, progress=progress).run()
    wall = time.perf_counter() - t0
    state["thread"].join(timeout=300)
    cluster.add_node(**local_node_args(num_cpus=2, resources={"spot": 2}))  # three worker nodes again
    m = result.manifest
    if not result.ok:
        raise RuntimeError(f"{preemption}: the job failed: {m}")
    return {
        "preemption": preemption,
        "frames": frames,
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
    clip = sample_clip(frames)
    out = scratch("preemption")
    runs = []
    health = {"health_check_period_ms": 200, "health_check_failure_threshold": 5}  # a killed node is seen in ~1 s
    cluster = local_cluster({"num_cpus": 0, "include_dashboard": False, "_system_config": health},
                            [{"num_cpus": 2, "resources": {"spot": 2}}] * 3)
    try:
        ensure_ray(cluster.address)
        for preemption in ("drain", "ignore"):
            r = run_one(cluster, clip, frames, out / preemption, preemption)
            print(f"{preemption}: {r['frames_rerendered']} of {frames} frames rendered twice ({r['wasted']:.1%}), "
                  f"{r['wall_s']} s")
            runs.append(r)  # three worker nodes again: one killed, one added
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    m = machine()
    drain, ignore = runs
    write_result("preemption", {
        "machine": m,
        "machine_line": machine_line(m),
        "what": f"synthetic model, 0.1 s/frame, {frames} frames in shards of 8, 3 actors on 3 nodes; one node "
                f"gets a {NOTICE_S:g} s preemption notice at 50% of the job and is killed at its deadline",
        "baseline": "scheduler.preemption: ignore",
        "runs": runs,
        "summary": {"wasted_drain": drain["wasted"], "wasted_ignore": ignore["wasted"]},
    }, args.quick)


if __name__ == "__main__":
    main()
