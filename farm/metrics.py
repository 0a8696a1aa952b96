"""Side channels of the run's event log: job metrics through ``ray.util.metrics`` and the ledger's copy.

Metrics show in the Ray dashboard and its Prometheus endpoint. They are fed by the driver's events
(``farm.events``), never by the workers, so a metric counts exactly what the ledger records. Every
metric is tagged by ``job`` and ``model``; Prometheus names carry Ray's ``ray_`` prefix
(``farm_frames_rendered`` is scraped as ``ray_farm_frames_rendered``).

Both are side channels: an error in them is logged, never raised into the job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from farm.events import FAILURE_KINDS, LOSS_KINDS, Event, EventKind, EventLog

log = logging.getLogger("farm")

TAGS = ("job", "model")
SECONDS_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]
LEVELS_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]  # seam disagreement, in 8-bit levels (1/255)


class JobMetrics:
    """One job's metrics; ``on_event`` subscribes to the run's event log."""

    def __init__(self, job_id: str, model: str, storage_options: dict[str, Any]) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"job": job_id, "model": model}
        self.so = storage_options

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, description=doc, tag_keys=TAGS)

        self.frames = counter("farm_frames_rendered", "Frames rendered (committed shard frames).")
        self.shards_done = counter("farm_shards_done", "Shards finished and recorded in the ledger.")
        self.shards_failed = counter("farm_shards_failed", "Shard attempts that raised or lost their actor.")
        self.shards_retried = counter("farm_shards_retried", "Shard dispatches that were retries.")
        self.videos_done = counter("farm_videos_done", "Videos whose outputs were committed.")
        self.videos_failed = counter("farm_videos_failed", "Videos that failed.")
        self.bytes_written = counter("farm_bytes_written", "Bytes of committed outputs.")
        self.frames_rerendered = counter(
            "farm_frames_rerendered", "Frames rendered again because a node was lost or drained (estimated from "
            "the measured seconds per frame).")
        self.nodes_draining = counter("farm_nodes_draining", "Drain notices (preemption) received for nodes.")
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
        self.shards_left: dict[str, int] = {}  # video -> shards not done, of the videos still running
        self.worst = 0.0

    def on_event(self, event: Event) -> None:
        kind, e, t = event.kind, event.data, self.tags
        if kind == EventKind.START:
            self.shards_left = dict(e.get("shards", {}))
        elif kind == EventKind.ACTOR_READY:
            self.actors += 1
            self.active_actors.set(self.actors, t)
            if e.get("load_seconds") is not None:
                self.load_seconds.set(float(e["load_seconds"]), t)
        elif kind == EventKind.ACTOR_RETIRED:
            self.actors = max(0, self.actors - 1)
            self.active_actors.set(self.actors, t)
        elif kind == EventKind.SHARD_DISPATCHED:
            self.in_flight += 1
            if e.get("attempt", 1) > 1:
                self.shards_retried.inc(1, t)
        elif kind == EventKind.SEAM_MEASURED:
            self.worst = max(self.worst, float(e["worst"]))
            self.seam_worst.set(self.worst, t)
            self.seam_mean.observe(float(e["mean"]), t)
        elif kind == EventKind.SHARD_DONE:
            self.in_flight = max(0, self.in_flight - 1)
            if e["video"] in self.shards_left:
                self.shards_left[e["video"]] -= 1
            self.frames.inc(int(e["frames"]), t)
            self.shards_done.inc(1, t)
            self.shard_seconds.observe(float(e["seconds"]), t)
        elif kind == EventKind.SHARD_FAILED:
            self.in_flight = max(0, self.in_flight - 1)
            self.shards_failed.inc(1, t)
        elif kind == EventKind.SHARD_CHECKPOINTED:  # its continuation is dispatched again
            self.in_flight = max(0, self.in_flight - 1)
        elif kind == EventKind.NODE_DRAINING:
            self.nodes_draining.inc(1, t)
        if kind in LOSS_KINDS and e.get("frames_lost"):
            self.frames_rerendered.inc(int(e["frames_lost"]), t)
        elif kind == EventKind.VIDEO_DONE:
            self.videos_done.inc(1, t)
            self.bytes_written.inc(self._output_bytes(e.get("outputs", [])), t)
        elif kind == EventKind.VIDEO_FAILED:
            self.shards_left.pop(e.get("video"), None)
            self.videos_failed.inc(1, t)
        if kind == EventKind.START:
            self.seam_worst.set(0.0, t)  # exported from the start: 0 until a seam is measured (handoff: always)
        if kind == EventKind.FINISH:
            self.actors = 0
            self.active_actors.set(0, t)
            self.queue_depth.set(0, t)
            self.in_flight = 0
        elif kind in (EventKind.START, EventKind.SHARD_DISPATCHED, EventKind.SHARD_DONE, EventKind.SHARD_FAILED,
                      EventKind.SHARD_CHECKPOINTED, EventKind.VIDEO_FAILED):
            self.queue_depth.set(max(0, sum(self.shards_left.values()) - self.in_flight), t)
        if kind in (EventKind.START, EventKind.FINISH, EventKind.SHARD_DISPATCHED, EventKind.SHARD_DONE,
                    EventKind.SHARD_FAILED, EventKind.SHARD_CHECKPOINTED):
            self.shards_running.set(self.in_flight, t)

    def _output_bytes(self, urls: list[str]) -> int:
        import fsspec

        total = 0
        for url in urls:
            try:
                fs, path = fsspec.core.url_to_fs(url, **self.so)
                total += sum(fs.du(path, total=False).values()) if fs.isdir(path) else fs.size(path)
            except Exception:  # a metric must not fail the job
                continue
        return int(total)


class LedgerCopy:
    """Keeps ``events.json`` in the ledger equal to the log: rewritten after a failure event (at most once a
    second, so ``farm status JOB.yaml`` counts failures mid-run) and by ``flush`` at the end of the run."""

    def __init__(self, ledger: Any, log: EventLog, every_s: float = 1.0) -> None:
        self.ledger, self.log, self.every_s = ledger, log, every_s
        self.written, self.pending, self.enabled = 0.0, False, True

    def on_event(self, event: Event) -> None:
        self.pending = self.pending or event.kind in FAILURE_KINDS
        if self.enabled and self.pending and time.monotonic() - self.written >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self.ledger.write_events(self.log.events)
        self.written, self.pending = time.monotonic(), False
