"""One video rendered as one shard by the actor's code in process (no Ray): ``ModelWorker`` decodes the frames
itself, calls the model and writes each output channel as PNGs. A two-pass model's pass 1 goes to the ledger
(8-bit, as a job keeps it) and its pass 2 reads it back from there, as the driver's stage-1 shard does."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from farm.channels import CHANNEL_NEEDS, components
from farm.plan import plan_shards
from farm.sinks import OutputTarget
from farm.worker import ModelWorker, ShardTask


def render_in_worker(worker: ModelWorker, url: str, size: tuple[int, int, int], fps: float, cond: Any,
                     out: Path) -> dict[str, np.ndarray]:
    """``size`` = (frames, height, width) of the video at ``url``; returns ``uint8 [T, H, W, C]`` per output
    channel, read back from the PNGs the worker wrote under ``out``."""
    assert worker.load_error is None, worker.load_error
    t, h, w = size
    rate = Fraction(fps).limit_denominator(1001)
    channels = [k for k in worker.model.outputs if k in CHANNEL_NEEDS]
    targets = {ch: OutputTarget(url=str(out / ch), parts_url=str(out / "parts" / ch), format="png",
                                fps_num=rate.numerator, fps_den=rate.denominator, width=w, height=h,
                                components=components(ch)) for ch in channels}
    (shard,) = plan_shards("clip", t, t)
    task = ShardTask(job_id="in-worker", video_key="clip", url=url, shard=shard, targets=targets,
                     ledger_root=str(out / "ledger"), chunk=worker.model.chunk_frames, passes=worker.model.passes)
    record, _ = worker.render_shard(task, cond, None)
    if worker.model.passes == 2:
        previous = [{"start": shard.start, "stop": shard.stop, "url": record["previous"]}]
        stage1 = dataclasses.replace(task, shard=dataclasses.replace(shard, stage=1), previous=previous)
        worker.render_shard(stage1, cond, None)
    got = {}
    for ch in channels:
        pngs = sorted((out / ch).glob("*.png"))
        assert len(pngs) == t, (ch, len(pngs))
        got[ch] = np.stack([np.asarray(Image.open(p)) for p in pngs]).reshape(t, h, w, -1)
    return got
