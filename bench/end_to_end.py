"""End to end: one clip through farm (2 actors) against a plain single-process loop, keyer and RVM.

The plain loop is written the way RVM's ``convert_video`` works: PyAV decodes frames, the model renders
them in chunks carrying its state, and PyAV encodes the outputs with farm's own encoder settings
(``farm.encode.SegmentWriter``: x264 crf 16, farm's default ``output.preset``, no B-frames), so only the
orchestration differs. Both timings include loading the model. Threads: the plain loop keeps torch's default (one
per core); each farm actor gets what Ray gives an actor of ``cpus_per_actor=1`` (OMP_NUM_THREADS=1;
``torch.get_num_threads()`` is read in a ``num_cpus=1`` task), so both use one compute thread per core.
Ray runs its workers at nice 15 (``worker_niceness``), the plain loop runs at nice 0: on a machine
busy with other work that favours the plain loop.
"""

from __future__ import annotations

import os
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

from bench.common import (
    RVM_WEIGHTS,
    SHARED_VIDEOS,
    EventLog,
    default_preset,
    job_spec,
    machine,
    machine_line,
    parse_args,
    scratch,
    shard_stages,
    trimmed_clip,
    write_result,
)

CHANNELS = ("alpha", "fgr")
ACTORS = 2


def plain_loop(model_cfg: dict[str, Any], src: str, out_dir: str, chunk: int = 16) -> dict[str, Any]:
    """Decode -> render chunk -> encode in one process, as RVM's convert_video does."""
    import av
    import numpy as np

    from actors import load_model_class
    from actors.base import VideoContext
    from farm.channels import channel_frames, components
    from farm.encode import SegmentWriter
    from farm.stitch import to_uint8

    t0 = time.perf_counter()
    model = load_model_class(model_cfg["name"])(**model_cfg.get("params", {}))
    model.load(model_cfg.get("weights"), device="cpu", dtype="float32")
    t_loaded = time.perf_counter()
    frames = 0
    with av.open(src) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"  # as farm's reader
        fps = Fraction(v.average_rate)
        w, h = v.codec_context.width, v.codec_context.height
        n = v.frames
        cond = model.prepare(VideoContext(url=src, frame_count=n, width=w, height=h, fps=float(fps)))
        writers = {
            ch: SegmentWriter(os.path.join(out_dir, f"plain_{ch}.mp4"), fps, w, h, channels=components(ch),
                              preset=default_preset())
            for ch in CHANNELS
        }
        state = None
        buf: list[Any] = []

        def flush() -> None:
            nonlocal state, frames
            outputs, state = model.render(np.stack(buf), cond, state)  # [t, H, W, 3] uint8 in
            for ch, wr in writers.items():
                for f in to_uint8(channel_frames(outputs, ch)):
                    wr.write(f)
            frames += len(buf)
            buf.clear()

        for frame in c.decode(v):
            buf.append(frame.to_ndarray(format="rgb24"))
            if len(buf) == chunk:
                flush()
        if buf:
            flush()
        for wr in writers.values():
            wr.close()
    t1 = time.perf_counter()
    threads = None
    if "torch" in __import__("sys").modules:
        import torch

        threads = torch.get_num_threads()
    return {
        "frames": frames,
        "seconds": round(t1 - t0, 3),
        "load_s": round(t_loaded - t0, 3),
        "fps": round(frames / (t1 - t0), 3),
        "torch_threads": threads,
    }


def farm_run(model_cfg: dict[str, Any], src: str, out_dir: Any, window: dict[str, Any] | None, tag: str) -> dict:
    from farm.driver import run_job

    spec = job_spec(
        f"e2e-{tag}", [src], out_dir, model_cfg, actors=ACTORS, cpus_per_actor=1.0, window=window, channels=CHANNELS
    )
    log = EventLog()
    t0 = time.time()
    result = run_job(spec, progress=log)
    t1 = time.time()
    if not result.ok:
        raise RuntimeError(f"farm run {tag} failed: {result.manifest}")
    (video,) = result.manifest["videos"].values()
    frames = video["frames"]
    pool = max(log.received("actor_ready")) - log.received("start")[0]
    stages = shard_stages(Path(out_dir))  # where the shards' time went
    return {
        "frames": frames,
        "shards": video["shards"],
        "state_mode": result.manifest["state_mode"],
        "window": window,
        "seconds": round(t1 - t0, 3),
        "pool_start_s": round(pool, 3),
        "fps": round(frames / (t1 - t0), 3),
        "fps_excl_pool_start": round(frames / (t1 - t0 - pool), 3),
        "stages": stages,
    }


def actor_torch_threads() -> int:
    """torch.get_num_threads() in a Ray worker with num_cpus=1, as each farm actor has."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def main() -> None:
    args = parse_args(__doc__)
    import ray

    m = machine()
    src = str(SHARED_VIDEOS / "cockatoo.mp4")
    if args.quick:
        src = trimmed_clip(src, 64)
    else:
        src = trimmed_clip(src, 280)  # the whole clip, re-encoded yuv420p as farm writes (the original is 4:4:4)
    rvm = {"name": "rvm", "weights": str(RVM_WEIGHTS), "params": {"downsample_ratio": 0.5}}
    # cockatoo is no green screen: key the fixed green (the keyer's cost does not depend on the picture)
    keyer = {"name": "keyer", "params": {"key": "green"}}
    cases = [
        ("keyer", keyer, None),
        ("rvm_handoff", rvm, None),  # RVM's default: one chain, exact
        ("rvm_preroll", rvm, {"frames": 70 if not args.quick else 32, "state": "preroll", "preroll": 16}),
    ]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    threads_in_actor = actor_torch_threads()
    rows = []
    plain_cache: dict[str, dict] = {}
    for tag, cfg, window in cases:
        out = scratch(f"e2e-{tag}")
        if cfg["name"] not in plain_cache:
            plain_cache[cfg["name"]] = plain_loop(cfg, src, str(out))
        plain = plain_cache[cfg["name"]]
        farm = farm_run(cfg, src, out, window, tag)
        shutil.rmtree(out, ignore_errors=True)
        row = {"case": tag, "plain": plain, "farm": farm, "ratio": round(farm["fps"] / plain["fps"], 3)}
        print(f"{tag:12s} plain {plain['fps']:.2f} fps  farm {farm['fps']:.2f} fps  ratio {row['ratio']:.2f}")
        rows.append(row)
    ray.shutdown()
    write_result(
        "end_to_end",
        {
            "machine": m,
            "machine_line": machine_line(m),
            "input": src,
            "channels": list(CHANNELS),
            "farm_actors": ACTORS,
            "threads": {
                "plain_loop_torch_threads": max((r["plain"]["torch_threads"] or 0) for r in rows),
                "actor_torch_threads": threads_in_actor,
                "choice": "each side uses one compute thread per core: the plain loop torch's default, each of the "
                "2 actors 1 thread (Ray's OMP_NUM_THREADS for cpus_per_actor=1)",
            },
            "baseline": "plain single-process loop decode -> model.render chunks -> SegmentWriter encode",
            "cases": rows,
            "target": {"case": "rvm", "ratio": 1.5},
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
