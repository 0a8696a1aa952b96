"""Memory: peak RSS of the driver and of the actors for the same job on 1,000 and 10,000 frames.

Pixels never pass through the driver and actors stream their frames in chunks, so neither should grow
with the video's length: the ratio of the peaks (10x the frames against 1x) should stay near 1.
Each size runs in a fresh driver process, so its peak (``VmHWM`` from /proc) belongs to that job only;
actor peaks are polled from a thread by pid (the driver's ``actor_ready`` event carries it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    EventLog,
    PeakSampler,
    job_spec,
    machine,
    machine_line,
    parse_args,
    proc_status_kb,
    sample_clip,
    scratch,
    write_result,
)

SIZES = (1_000, 10_000)
QUICK_SIZES = (300, 3_000)


def child(frames: int) -> dict[str, Any]:
    """One job in this (fresh) process; returns the peaks in MiB."""
    import os
    import shutil

    import ray

    from farm.driver import run_job

    clip = sample_clip(frames)
    out = scratch(f"memory-{frames}")
    spec = job_spec(
        f"mem-{frames}",
        [clip],
        out,
        {"name": "synthetic", "params": {"sleep_per_frame": 0}},
        actors=2,
        channels=("alpha", "fgr"),
    )
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    me = os.getpid()
    before = proc_status_kb(me, "VmRSS")
    log = EventLog()
    t0 = time.time()
    with PeakSampler() as sampler:
        sampler.add(me)
        log.on_ready.append(lambda d: sampler.add(int(d["pid"])))
        result = run_job(spec, progress=log)
    seconds = time.time() - t0
    shutil.rmtree(out, ignore_errors=True)
    if not result.ok:
        raise RuntimeError(f"memory run {frames} failed: {result.manifest}")
    (video,) = result.manifest["videos"].values()
    driver_peak = max(sampler.peak_kb.get(me, 0), proc_status_kb(me, "VmHWM") or 0)
    actors = [sampler.peak_kb.get(p, 0) for p in log.pids]
    ray.shutdown()
    return {
        "frames": frames,
        "shards": video["shards"],
        "seconds": round(seconds, 2),
        "driver_rss_before_job_mib": round(before / 1024, 1),
        "driver_peak_mib": round(driver_peak / 1024, 1),
        "driver_growth_mib": round((driver_peak - before) / 1024, 1),
        "actor_peak_mib": [round(a / 1024, 1) for a in actors],
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(int(sys.argv[2]))))
        return
    args = parse_args(__doc__)
    m = machine()
    runs = []
    for frames in QUICK_SIZES if args.quick else SIZES:
        sample_clip(frames)  # made outside the measured process
        p = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child", str(frames)], capture_output=True, text=True
        )
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or line is None:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
            raise SystemExit(f"memory child for {frames} frames failed (exit {p.returncode})")
        r = json.loads(line[len("RESULT ") :])
        print(r)
        runs.append(r)
    small, big = runs
    write_result(
        "memory",
        {
            "machine": m,
            "machine_line": machine_line(m),
            "what": "synthetic model (sleep 0), 64x48 frames, 2 actors, channels alpha+fgr, window 16 frames",
            "baseline": f"the same job on {small['frames']} frames",
            "runs": runs,
            "ratio_driver_peak": round(big["driver_peak_mib"] / small["driver_peak_mib"], 3),
            "ratio_driver_growth": round(big["driver_growth_mib"] / max(small["driver_growth_mib"], 0.1), 3),
            "ratio_actor_peak": round(max(big["actor_peak_mib"]) / max(small["actor_peak_mib"]), 3),
            "target_ratio": 1.1,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
