"""Job metrics through ``ray.util.metrics``: they show in the Ray dashboard and its Prometheus endpoint.

Fed by the driver's events (``JobRunner.event``), never by the workers, so a metric counts exactly what
the ledger records. Every metric is tagged by ``job`` and ``model``; Prometheus names carry Ray's
``ray_`` prefix (``farm_frames_rendered`` is scraped as ``ray_farm_frames_rendered``).

Metrics and the ledger's failure events are side channels: an error in them is logged, never raised
into the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("farm")

Progress = Callable[[str, dict[str, Any]], None]
TAGS = ("job", "model")
SECONDS_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]
LEVELS_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]  # seam disagreement, in 8-bit levels (1/255)


class JobMetrics:
    """One job's metrics; ``on_event`` is a progress listener."""

    def __init__(self, runner: Any) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.runner = runner
        self.tags = {"job": runner.spec.job_id, "model": runner.spec.model.name}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, description=doc, tag_keys=TAGS)

        self.frames = counter("farm_frames_rendered", "Frames rendered (committed shard frames).")
        self.shards_done = counter("farm_shards_done", "Shards finished and recorded in the ledger.")
        self.shards_failed = counter("farm_shards_failed", "Shard attempts that raised or lost their actor.")
        self.shards_retried = counter("farm_shards_retried", "Shard dispatches that were retries.")
        self.videos_done = counter("farm_videos_done", "Videos whose outputs were committed.")
        self.videos_failed = counter("farm_videos_failed", "Videos that failed.")
        self.bytes_written = counter("farm_bytes_written", "Bytes of committed outputs.")
        self.shard_seconds = Histogram(
            "farm_shard_seconds", description="Seconds per shard on its actor.", boundaries=SECONDS_BUCKETS,
            tag_keys=TAGS,
        )
        self.load_seconds = Gauge("farm_model_load_seconds", description="Model load time of the last actor.",
                                  tag_keys=TAGS)
        self.queue_depth = Gauge("farm_queue_depth", description="Shards not yet done nor running.", tag_keys=TAGS)
        self.active_actors = Gauge("farm_active_actors", description="Model actors alive in the pool.",
                                   tag_keys=TAGS)
        self.shards_running = Gauge("farm_shards_running", description="Shard attempts running on actors now.",
                                    tag_keys=TAGS)
        self.seam_worst = Gauge(
            "farm_seam_disagreement", tag_keys=TAGS,
            description="Worst seam so far: mean absolute difference (1/255) of the worst frame two shards both "
            "rendered, before blending.",
        )
        self.seam_mean = Histogram(
            "farm_seam_disagreement_per_seam", boundaries=LEVELS_BUCKETS, tag_keys=TAGS,
            description="Mean absolute difference (1/255) between two shards' renders of their shared frames, "
            "one observation per seam and output.",
        )
        self.actors = 0
        self.in_flight = 0
        self.worst = 0.0

    def on_event(self, kind: str, e: dict[str, Any]) -> None:
        t = self.tags
        if kind == "actor_ready":
            self.actors += 1
            self.active_actors.set(self.actors, t)
            if e.get("load_seconds") is not None:
                self.load_seconds.set(float(e["load_seconds"]), t)
        elif kind == "actor_retired":
            self.actors = max(0, self.actors - 1)
            self.active_actors.set(self.actors, t)
        elif kind == "shard_dispatched":
            self.in_flight += 1
            if e.get("attempt", 1) > 1:
                self.shards_retried.inc(1, t)
        elif kind == "seam_measured":
            self.worst = max(self.worst, float(e["worst"]))
            self.seam_worst.set(self.worst, t)
            self.seam_mean.observe(float(e["mean"]), t)
        elif kind == "shard_done":
            self.in_flight = max(0, self.in_flight - 1)
            self.frames.inc(int(e["frames"]), t)
            self.shards_done.inc(1, t)
            self.shard_seconds.observe(float(e["seconds"]), t)
        elif kind == "shard_failed":
            self.in_flight = max(0, self.in_flight - 1)
            self.shards_failed.inc(1, t)
        elif kind == "video_done":
            self.videos_done.inc(1, t)
            self.bytes_written.inc(self._output_bytes(e["video"]), t)
        elif kind == "video_failed":
            self.videos_failed.inc(1, t)
        if kind == "start":
            self.seam_worst.set(0.0, t)  # exported from the start: 0 until a seam is measured (handoff: always)
        if kind == "finish":
            self.actors = 0
            self.active_actors.set(0, t)
            self.queue_depth.set(0, t)
            self.in_flight = 0
        elif kind in ("start", "shard_dispatched", "shard_done", "shard_failed", "video_failed"):
            self.queue_depth.set(self._queue_depth(), t)
        if kind in ("start", "finish", "shard_dispatched", "shard_done", "shard_failed"):
            self.shards_running.set(self.in_flight, t)

    def _queue_depth(self) -> int:
        left = sum(
            len(r.shards) - len(r.records) for r in self.runner.videos.values() if r.status in ("waiting", "running")
        )
        return max(0, left - self.in_flight)

    def _output_bytes(self, video_key: str) -> int:
        import fsspec

        run = self.runner.videos.get(video_key)
        total = 0
        for out in (run.outputs.values() if run else ()):
            url = out.get("url")
            if not url:
                continue
            try:
                fs, path = fsspec.core.url_to_fs(url, **self.runner.so)
                total += sum(fs.du(path, total=False).values()) if fs.isdir(path) else fs.size(path)
            except Exception:  # a metric must not fail the job
                continue
        return int(total)


class LedgerEvents:
    """Failure events into the ledger (``events/``), so ``farm status JOB.yaml`` can count them mid-run."""

    KINDS = ("shard_failed", "video_failed", "input_error", "actor_retired")

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def on_event(self, kind: str, e: dict[str, Any]) -> None:
        if kind in self.KINDS and getattr(self.runner, "ledger", None) is not None:
            self.runner.ledger.append_event(e)


def with_listeners(runner: Any, progress: Progress | None) -> Progress:
    """The runner's progress callback, followed by the metrics and ledger-event listeners."""
    listeners: list[Progress] = [progress] if progress else []
    side: list[Progress] = []
    try:
        side.append(JobMetrics(runner).on_event)
    except Exception as exc:  # e.g. Ray not initialized: the job still runs
        log.warning("farm: metrics disabled (%s)", exc)
    side.append(LedgerEvents(runner).on_event)

    def tee(kind: str, data: dict[str, Any]) -> None:
        for fn in listeners:
            fn(kind, data)
        for fn in side:
            try:
                fn(kind, data)
            except Exception as exc:
                log.warning("farm: %s listener failed on %s: %s", getattr(fn, "__qualname__", fn), kind, exc)

    return tee
