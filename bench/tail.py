"""Tail: wall time of a job when one actor of the pool is 5x slower, with and without speculative copies.

The synthetic model sleeps ``S`` seconds per frame (no CPU), and ``S * 5`` on actor 0, so only the
scheduler decides the wall time. Without speculation the job waits at its tail for the slow actor's
last shard; with it, an idle fast actor renders a copy and the first result wins. Also reported: the
ideal wall time of this uneven pool (all frames spread over 3 + 1/5 actors' worth of speed).
"""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

import yaml

from bench.common import machine, machine_line, parse_args, sample_clip, scratch, write_result

ACTORS = 4
SLOW_FACTOR = 5.0


def run_one(speculative: bool, frames: int, window: int, sleep: float, tag: str) -> dict[str, Any]:
    from farm.driver import run_job
    from farm.spec import parse_spec

    out = scratch(f"tail-{tag}")
    job = {
        "name": f"tail-{tag}",
        "inputs": [sample_clip(frames)],
        "model": {
            "name": "synthetic",
            "params": {"sleep_per_frame": sleep, "slow_actor": 0, "slow_factor": SLOW_FACTOR},
        },
        "window": {"frames": window, "overlap": 0},
        "output": {"uri": str(out / "{job}/{stem}_{channel}.{ext}"), "channels": ["alpha"], "format": "mp4"},
        "resources": {"actors": ACTORS, "cpus_per_actor": 0.5},
        "scheduler": {"speculative": speculative},
    }
    events: list[tuple[float, str, dict[str, Any]]] = []
    t0 = time.time()
    spec = parse_spec(yaml.safe_dump(job), "bench/tail.yaml")
    result = run_job(spec, progress=lambda k, d: events.append((time.time(), k, d)))
    wall = time.time() - t0
    shutil.rmtree(out, ignore_errors=True)
    if not result.ok:
        raise RuntimeError(f"tail run {tag} failed: {result.manifest}")
    first = min(t for t, k, _ in events if k == "shard_dispatched")
    last = max(t for t, k, _ in events if k == "shard_done")
    return {
        "speculative": speculative,
        "wall_s": round(wall, 3),
        "render_s": round(last - first, 3),  # first dispatch -> last shard done: where the tail shows
        "copies": sum(1 for _, k, _ in events if k == "shard_speculated"),
        "cancelled": sum(1 for _, k, _ in events if k == "shard_cancelled"),
        "shards_on_slow_actor": sum(1 for _, k, d in events if k == "shard_done" and d["actor"] == 0),
    }


def main() -> None:
    args = parse_args(__doc__)
    import ray

    # Shard counts: where the slow actor's last shard starts relative to the end of the fast actors'
    # work depends on it, so the tail (and what a copy saves) is measured at several.
    window, sleep = 40, 0.02  # a shard: 0.8 s on a fast actor, 4 s on the slow one
    shard_counts, repeats = ((20,), 1) if args.quick else ((16, 20, 24), 2)
    m = machine()
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    cases = []
    for n in shard_counts:
        frames = n * window
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for r in range(repeats):
            for mode in ("off", "on"):  # interleaved, so drift in the machine's load hits both alike
                runs[mode].append(run_one(mode == "on", frames, window, sleep, f"{n}-{mode}-{r}"))
                print(n, mode, runs[mode][-1])
        med = {mode: statistics.median(x["render_s"] for x in rs) for mode, rs in runs.items()}
        wall = {mode: statistics.median(x["wall_s"] for x in rs) for mode, rs in runs.items()}
        cases.append(
            {
                "shards": n,
                "frames": frames,
                "ideal_render_s": round(frames * sleep / (ACTORS - 1 + 1 / SLOW_FACTOR), 3),
                "median_render_s": {k: round(v, 3) for k, v in med.items()},
                "median_wall_s": {k: round(v, 3) for k, v in wall.items()},
                "render_ratio_on_over_off": round(med["on"] / med["off"], 3),
                "wall_ratio_on_over_off": round(wall["on"] / wall["off"], 3),
                "runs": runs,
            }
        )
    ray.shutdown()
    total = {mode: sum(c["median_render_s"][mode] for c in cases) for mode in ("off", "on")}
    data = {
        "setup": {
            "actors": ACTORS,
            "slow_actor_factor": SLOW_FACTOR,
            "shard_frames": window,
            "sleep_per_frame_s": sleep,
            "repeats": repeats,
            "render_s": "first shard_dispatched to last shard_done (the wall time without actor start and commit)",
        },
        "render_ratio_on_over_off_all_cases": round(total["on"] / total["off"], 3),
        "cases": cases,
        "machine": m,
    }
    write_result("tail", data, args.quick)
    print(machine_line(m))
    for c in cases:
        print(
            f"{c['shards']} shards: render off {c['median_render_s']['off']:.2f} s, "
            f"on {c['median_render_s']['on']:.2f} s (ratio {c['render_ratio_on_over_off']}), "
            f"ideal {c['ideal_render_s']:.2f} s"
        )
    print(f"all cases: on/off = {data['render_ratio_on_over_off_all_cases']}")


if __name__ == "__main__":
    main()
