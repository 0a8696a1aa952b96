"""Accelerator busy share: how much of a shard's wall time the model's device is computing.

The ``synthetic`` model takes a fixed time per frame, sleeping what its own small CPU work leaves: it
stands for an accelerator (0.08 s/frame = 12.5 fps). Its busy share is frames x sleep / the video's
render seconds (from the manifest): 1.0 means the device never waits on decoding, conversion, encoding
or uploads. cockatoo 720p (280 frames), one actor owning the machine (``cpus_per_actor`` = its cores),
``window.frames: 70``, mp4 ``alpha`` + ``fgr`` at farm's default ``output.preset`` (veryfast), 0.02, 0.05
and 0.08 s/frame; 0.08 s/frame with x264's own default preset, ``medium``; and a png job at 0.08.
Each case runs twice: the actor as a pipeline (farm) and the serial loop (``FARM_PIPELINE=0``: decode,
model, convert, encode, upload on one thread, one shard at a time), each setting in a Ray session of its
own so the actors see it. The mp4 cases at 0.08 s/frame also run pipelined with one shard per actor
(``scheduler.shards_per_actor: 1``), which shows what the queued second shard adds. The 1-minute load
average is recorded with every figure, and the shards' stage CPU seconds.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from bench.common import (
    SHARED_VIDEOS,
    default_preset,
    job_spec,
    machine,
    machine_line,
    parse_args,
    scratch,
    shard_stages,
    write_result,
)

SLEEPS = (0.02, 0.05, 0.08)
WINDOW = {"frames": 70}
CHANNELS = ("alpha", "fgr")
DEFAULT_PRESET = default_preset()  # the cases that give none run with it
CPUS = float(os.cpu_count() or 1)  # the one actor owns the machine: its encoders' thread counts come from this


def run_case(
    src: str, sleep: float, fmt: str, preset: str | None, tag: str, shards_per_actor: int = 2
) -> dict[str, Any]:
    from farm.driver import run_job

    out = scratch(f"accel-{tag}")
    spec = job_spec(
        f"accel-{tag}",
        [src],
        out,
        {"name": "synthetic", "params": {"sleep_per_frame": sleep}},
        actors=1,
        cpus_per_actor=CPUS,
        window=WINDOW,
        channels=CHANNELS,
        format=fmt,
        preset=preset,
        scheduler={"shards_per_actor": shards_per_actor},
    )
    load = os.getloadavg()[0]
    t0 = time.time()
    result = run_job(spec)
    wall = time.time() - t0
    stages = shard_stages(out)
    if not stages:
        raise RuntimeError(f"accelerator run {tag}: no shard record with stages under {out}")
    output_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and ".farm" not in f.parts)
    shutil.rmtree(out, ignore_errors=True)
    if not result.ok:
        raise RuntimeError(f"accelerator run {tag} failed: {result.manifest}")
    (video,) = result.manifest["videos"].values()
    busy = video["frames"] * sleep / video["seconds"]
    return {
        "frames": video["frames"],
        "shards": video["shards"],
        "render_s": video["seconds"],
        "job_wall_s": round(wall, 2),
        "model_s": round(video["frames"] * sleep, 2),
        "busy_share": round(busy, 3),
        # over the whole job instead (intake, the actor's start and the model's load included)
        "busy_share_job_wall": round(video["frames"] * sleep / wall, 3),
        "stages": stages,
        "output_mb": round(output_bytes / 1e6, 2),
        "loadavg_1m_before": round(load, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    args = parse_args(__doc__)
    m = machine()
    src = str(SHARED_VIDEOS / "cockatoo.mp4")
    cases = [(s, "mp4", None) for s in SLEEPS] + [(0.08, "mp4", "medium"), (0.08, "png", None)]
    if args.quick:
        cases = [(0.08, "mp4", None), (0.08, "mp4", "medium")]
    import ray

    from farm.driver import ensure_ray

    rows: list[dict[str, Any]] = [
        {"sleep_per_frame": sleep, "format": fmt, "preset": preset or (DEFAULT_PRESET if fmt == "mp4" else None)}
        for sleep, fmt, preset in cases
    ]
    for key, setting in (("pipeline", "1"), ("serial", "0")):
        os.environ["FARM_PIPELINE"] = setting  # a Ray session of its own: its actors inherit the setting
        ensure_ray(num_cpus=os.cpu_count())
        try:
            for row in rows:
                sleep, fmt, preset = row["sleep_per_frame"], row["format"], row["preset"]
                arms = [(key, 2 if key == "pipeline" else 1)]
                if key == "pipeline" and fmt == "mp4" and sleep == 0.08:
                    arms.append(("pipeline_one_shard", 1))
                for arm, per_actor in arms:
                    row[arm] = run_case(src, sleep, fmt, preset, f"{fmt}-{preset}-{sleep}-{arm}", per_actor)
                    print(f"{fmt} {preset} {sleep:.2f} s/frame {arm}: {row[arm]}", flush=True)
        finally:
            ray.shutdown()
    for row in rows:
        row["ratio"] = round(row["pipeline"]["busy_share"] / row["serial"]["busy_share"], 3)
        print(
            f"{row['format']} {row['preset']} {row['sleep_per_frame']:.2f} s/frame: "
            f"busy {row['pipeline']['busy_share']:.2f} "
            f"pipelined, {row['serial']['busy_share']:.2f} serial (load {row['pipeline']['loadavg_1m_before']:.1f})",
            flush=True,
        )
    write_result(
        "accelerator",
        {
            "machine": m,
            "machine_line": machine_line(m),
            "input": src,
            "what": "synthetic model taking a fixed time per frame (an accelerator), 1 actor "
            f"(cpus_per_actor {CPUS:g}), window 70 frames, channels alpha+fgr",
            "busy_share": "frames x sleep_per_frame / the video's render seconds (manifest)",
            "baseline": "the same job with the actor's serial loop (FARM_PIPELINE=0)",
            "cases": rows,
            "target": {"sleep_per_frame": 0.08, "format": "mp4", "preset": DEFAULT_PRESET, "busy_share": 0.9},
            "model_cpu": "the synthetic model's own CPU work (the inversion) is about 0.01 CPU-s per 720p frame",
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
