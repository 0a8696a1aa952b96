"""Orchestration: how close farm's actor pool gets to ideal parallel time when the model costs no CPU.

The synthetic model sleeps ``S`` seconds per frame (no CPU) on tiny 64x48 frames, so decode and encode
are negligible and what is left over ideal (``frames * S / actors``) is farm's own cost: actor start,
dispatch, segment upload, ledger, commit. Measured for 1..16 actors on one Ray node, and on a
``ray.cluster_utils.Cluster`` of 4 nodes (head + 3 workers) on this same machine.

Each run's phases come from the driver's progress events (stamped when the callback receives them):
setup (connect, probe, plan), pool start (until the last ``actor_ready``), render (first
``shard_dispatched`` to last ``shard_done``) and tail (blend + commit of the output). Actors start
rendering as each loads, so pool start and render overlap; ``efficiency_once_ready`` divides the work by
the actor-seconds the pool offered from each actor's ``actor_ready`` on.
"""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

from bench.common import (
    EventLog,
    job_spec,
    local_node_args,
    machine,
    machine_line,
    parse_args,
    sample_clip,
    scratch,
    write_result,
)

ACTORS = (1, 2, 4, 8, 16)
CLUSTER_NODES = 4
CLUSTER_CPUS_PER_NODE = 4


def run_one(n: int, sleep: float, per_actor: int, window: int, cpus_per_actor: float, tag: str) -> dict[str, Any]:
    """One job of ``n * per_actor`` frames on ``n`` actors; returns its phases and efficiencies."""
    import ray

    from farm.driver import run_job

    frames = n * per_actor
    clip = sample_clip(frames)
    out = scratch(f"orchestration-{tag}-{n}")
    spec = job_spec(
        f"orch-{tag}-{n}",
        [clip],
        out,
        {"name": "synthetic", "params": {"sleep_per_frame": sleep}},
        actors=n,
        cpus_per_actor=cpus_per_actor,
        window={"frames": window, "overlap": 0},
    )
    log = EventLog()
    t0 = time.time()
    result = run_job(spec, progress=log)
    t1 = time.time()
    shutil.rmtree(out, ignore_errors=True)
    if not result.ok:
        raise RuntimeError(f"orchestration run {tag}/{n} failed: {result.manifest}")

    t_start = log.received("start")[0]
    ready = log.received("actor_ready")
    dispatched = log.received("shard_dispatched")
    done = log.received("shard_done")
    shards = len(done)
    wall = t1 - t0
    ideal = frames * sleep / n
    setup = t_start - t0
    pool = max(ready) - t_start
    render = max(done) - min(dispatched)
    tail = t1 - max(done)
    # Actors join the schedule as each loads: the capacity farm had is the sum over actors of the time from
    # its actor_ready to the last shard done; the work is frames * S. Their ratio is the efficiency of
    # the scheduling itself, whatever the actors' start-up cost.
    end = max(done)
    capacity = sum(end - t for (k, _), t in zip(log.events, log.stamps, strict=True) if k == "actor_ready")
    # Time inside the actor beyond the sleep (decode, encode, upload, checksum), per shard.
    in_actor = [d["seconds"] - d["frames"] * sleep for k, d in log.events if k == "shard_done"]
    # Driver gap: an actor's shard_done received -> its next shard_dispatched.
    gaps = _dispatch_gaps(log)
    nodes = _actor_nodes(ray, spec.job_id)
    return {
        "actors": n,
        "frames": frames,
        "shards": shards,
        "sleep_per_frame_s": sleep,
        "cpus_per_actor": cpus_per_actor,
        "ideal_s": round(ideal, 3),
        "wall_s": round(wall, 3),
        "setup_s": round(setup, 3),
        "pool_start_s": round(pool, 3),
        "render_s": round(render, 3),
        "tail_s": round(tail, 3),
        "efficiency": round(ideal / wall, 3),
        "efficiency_once_ready": round(frames * sleep / capacity, 3),
        "efficiency_render_phase": round(ideal / render, 3),
        "overhead_ms_per_shard": round(1000 * (wall - ideal) / shards, 1),
        "overhead_ms_per_shard_on_its_actor": round(1000 * (render - ideal) * n / shards, 1),
        "in_actor_overhead_ms_per_shard_median": round(1000 * statistics.median(in_actor), 1),
        "driver_dispatch_gap_ms_median": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "actor_nodes": nodes,
    }


def _dispatch_gaps(log: EventLog) -> list[float]:
    last_done: dict[int, float] = {}
    gaps = []
    for (kind, data), t in zip(log.events, log.stamps, strict=True):
        if kind == "shard_done":
            last_done[data["actor"]] = t
        elif kind == "shard_dispatched" and data["actor"] in last_done:
            gaps.append(t - last_done.pop(data["actor"]))
    return gaps


def _actor_nodes(ray: Any, job_id: str) -> int | None:
    """How many distinct Ray nodes the job's actors ran on (from the state API; None if unavailable)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(limit=10_000, raise_on_missing_output=False)
        return len({a.node_id for a in actors if a.name and a.name.startswith(job_id + "/actor-")})
    except Exception:
        return None


def main() -> None:
    args = parse_args(__doc__)
    import ray

    if args.quick:
        sleep, per_actor, window = 0.02, 100, 20  # ideal 2 s per run
    else:
        sleep, per_actor, window = 0.05, 240, 20  # ideal 12 s per run, 12 shards per actor
    m = machine()
    local = []
    ray.init(address="local", num_cpus=32, include_dashboard=False, logging_level="WARNING")
    for n in ACTORS:
        r = run_one(n, sleep, per_actor, window, cpus_per_actor=0.1, tag="local")
        print(_line("local", r))
        local.append(r)
    ray.shutdown()

    from ray.cluster_utils import Cluster

    from farm.pool import ensure_ray


    # every node on 127.0.0.1, not on this machine's network address
    cluster = Cluster(initialize_head=True, head_node_args=local_node_args(num_cpus=CLUSTER_CPUS_PER_NODE))
    for _ in range(CLUSTER_NODES - 1):
        cluster.add_node(**local_node_args(num_cpus=CLUSTER_CPUS_PER_NODE))
    cluster.wait_for_nodes()
    ensure_ray(cluster.address)
    multi = []
    try:
        for n in (4, 16) if args.quick else ACTORS:
            # One whole CPU per actor, so 16 actors fill the 4 nodes and must spread over them.
            r = run_one(n, sleep, per_actor, window, cpus_per_actor=1.0, tag="cluster")
            print(_line("cluster", r))
            multi.append(r)
    finally:
        ray.shutdown()
        cluster.shutdown()

    at16 = next(r for r in local if r["actors"] == 16)
    write_result(
        "orchestration",
        {
            "machine": m,
            "machine_line": machine_line(m),
            "what": "synthetic model, sleep_per_frame without CPU, 64x48 frames; ideal = frames*S/actors",
            "baseline": "ideal parallel time (frames * sleep_per_frame / actors)",
            "local_node": local,
            "cluster_4_nodes": {"nodes": CLUSTER_NODES, "cpus_per_node": CLUSTER_CPUS_PER_NODE, "runs": multi},
            "summary": {
                "efficiency_16_actors": at16["efficiency"],
                "efficiency_16_actors_once_ready": at16["efficiency_once_ready"],
                "overhead_ms_per_shard_16_actors": at16["overhead_ms_per_shard"],
                "target_efficiency": 0.9,
            },
        },
        quick=args.quick,
    )


def _line(tag: str, r: dict[str, Any]) -> str:
    return (
        f"{tag:8s} actors={r['actors']:2d} wall={r['wall_s']:.1f}s ideal={r['ideal_s']:.1f}s "
        f"eff={r['efficiency']:.2f} once_ready={r['efficiency_once_ready']:.2f} "
        f"render={r['efficiency_render_phase']:.2f} pool={r['pool_start_s']:.1f}s tail={r['tail_s']:.1f}s "
        f"in_actor={r['in_actor_overhead_ms_per_shard_median']}ms gap={r['driver_dispatch_gap_ms_median']}ms "
        f"nodes={r['actor_nodes']}"
    )


if __name__ == "__main__":
    main()
