"""The run report (one Parquet row per video, next to the job's manifest) and status from the ledger alone.

The report is for nightly batches: a cron job or a notebook reads ``report.parquet`` to see what
failed and why, without parsing logs. ``ledger_status`` answers ``farm status job.yaml`` from storage
only (plan, shard markers, video records, failure events), so it works with no cluster at all.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

from farm import storage
from farm.events import LOSS_KINDS, Event, EventKind
from farm.ledger import Ledger, ledger_root
from farm.stitch import seam_summary, worst_seam

REPORT_NAME = "report.parquet"


class RunCounts:
    """Per video, the shards dispatched, the shard attempts failed and the frames rendered again because a
    node was lost or drained; the nodes that got a drain notice. Subscribes to the run's event log."""

    def __init__(self) -> None:
        self.dispatched: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.rerendered: Counter[str] = Counter()
        self.drained: list[str] = []

    def on_event(self, event: Event) -> None:
        if event.kind == EventKind.SHARD_DISPATCHED:
            self.dispatched[event.data["video"]] += 1
        elif event.kind == EventKind.SHARD_FAILED:
            self.failed[event.data["video"]] += 1
        elif event.kind == EventKind.NODE_DRAINING and event.data["node"] not in self.drained:
            self.drained.append(event.data["node"])
        if event.kind in LOSS_KINDS and event.data.get("frames_lost"):
            self.rerendered[event.data["video"]] += int(event.data["frames_lost"])


def report_rows(result: Any, counts: RunCounts, fingerprints: dict[str, str | None]) -> list[dict[str, Any]]:
    """One row per video of the run: url, status, error, frames, seconds, fps, outputs, shards dispatched,
    and seam quality (``seam_disagreement_max``/``_mean``, 1/255; None for a video with no output)."""
    rows = []
    for key, v in result.manifest["videos"].items():
        frames = v["frames"]
        seconds = float(v["seconds"] or 0.0)
        rendered = v["status"] == "succeeded" and frames and seconds > 0
        seams = seam_summary(v.get("seams") or []) if v["status"] in ("succeeded", "skipped") else None
        rows.append(
            {
                "url": v["url"],
                "video": key,
                "status": v["status"],
                "error": v["error"],
                "frames": frames,
                "seconds": seconds,
                "fps": round(frames / seconds, 3) if rendered else None,  # render speed, frames per second
                "source_fps": v["fps"],
                "shards": v["shards"],
                "shards_dispatched": counts.dispatched.get(key, 0),
                "shards_failed": counts.failed.get(key, 0),
                "frames_rerendered": counts.rerendered.get(key, 0),  # of attempts lost with a node (estimated)
                "outputs": sorted(o["url"] for o in v["outputs"].values() if o.get("url")),
                "input_fingerprint": fingerprints.get(key),
                "seam_disagreement_max": seams["max"] if seams else None,
                "seam_disagreement_mean": seams["mean"] if seams else None,
            }
        )
    return rows


def write_report(ledger: Ledger, result: Any, counts: RunCounts, fingerprints: dict[str, str | None]) -> str:
    """Write ``report.parquet`` next to ``manifest.json`` (atomically) and return its URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("url", pa.string()),
            ("video", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("frames", pa.int64()),
            ("seconds", pa.float64()),
            ("fps", pa.float64()),
            ("source_fps", pa.string()),
            ("shards", pa.int64()),
            ("shards_dispatched", pa.int64()),
            ("shards_failed", pa.int64()),
            ("frames_rerendered", pa.int64()),
            ("outputs", pa.list_(pa.string())),
            ("input_fingerprint", pa.string()),
            ("seam_disagreement_max", pa.float64()),
            ("seam_disagreement_mean", pa.float64()),
        ]
    )
    table = pa.Table.from_pylist(report_rows(result, counts, fingerprints), schema=schema)
    table = table.replace_schema_metadata({"job": result.job_id, "manifest": result.manifest_url,
                                           "drained_nodes": ",".join(counts.drained)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return storage.write_bytes_atomic(ledger.url(REPORT_NAME), buf.getvalue(), ledger.storage_options)


def read_report(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options or {}))).to_pylist()


def summary_line(manifest: dict[str, Any]) -> str:
    """``N succeeded, N skipped, N failed of N videos, F frames in S s``: the line cron mails."""
    counts = Counter(v["status"] for v in manifest["videos"].values())
    frames = sum(v["frames"] or 0 for v in manifest["videos"].values() if v["status"] == "succeeded")
    parts = [f"{counts.get(s, 0)} {s}" for s in ("succeeded", "skipped", "failed")]
    n = len(manifest["videos"])
    line = f"{', '.join(parts)} of {n} videos, {frames} frames rendered in {manifest['seconds']:.1f}s"
    drained = manifest.get("drained_nodes") or []
    if drained:
        line += (f"; {len(drained)} node(s) drained ({', '.join(drained)}), "
                 f"{manifest.get('frames_rerendered', 0)} frames rendered again")
    return line


def count_frames_done(shards: list[dict[str, Any]], done: set[int], finished: bool = False) -> int:
    """The video's frames that are rendered: each done shard's own (core) frames, and each overlap once
    both shards that render it are done (then it is blended). Only grows as shards finish; a finished
    video counts all its frames. ``done`` holds positions in ``shards``; with two passes, frames are done
    after pass 2 (the last stage)."""
    total = shards[-1]["stop"] if shards else 0
    if finished:
        return total
    last = shards[-1].get("stage", 0) if shards else 0
    final = [(i, s) for i, s in enumerate(shards) if s.get("stage", 0) == last]
    count = sum(s["core_stop"] - s["core_start"] for i, s in final if i in done)
    for (i, s), (j, _) in zip(final, final[1:], strict=False):
        if i in done and j in done:
            count += s["stop"] - s["core_stop"]  # the overlap of shard i with shard i + 1
    return count


def ledger_status(spec: Any) -> dict[str, Any]:
    """Per video: shards done/total, frames, failures, status; read from the job's ledger in storage."""
    from farm.spec import absolute_local_paths

    spec = absolute_local_paths(spec)  # the job id is computed from absolute local paths, as run_job does
    ledger = Ledger(ledger_root(spec), spec.storage_options)
    plan = ledger.read_plan()
    doc: dict[str, Any] = {"job": spec.job_id, "ledger": storage.redact(ledger.root, spec.storage_options)}
    if plan is None:
        doc.update(state="not started", videos={})
        return doc
    manifest = ledger.read_manifest()
    events = ledger.read_events()
    failures = Counter(e.get("video") for e in events if e.get("event") == "shard_failed")
    videos = {}
    for key, p in plan["videos"].items():
        done = ledger.done_shards(key)
        shards = p["shards"]
        record = ledger.read_video(key)
        frames_done = count_frames_done(shards, done, finished=bool(record))
        m = (manifest or {}).get("videos", {}).get(key, {})
        if record:
            status = "succeeded"
        elif m.get("status") == "failed":
            status = "failed"
        else:
            status = "running" if manifest is None else m.get("status", "waiting")
        videos[key] = {
            "url": p["url"],
            "status": status,
            "shards_done": len(done),
            "shards": len(shards),
            "frames_done": frames_done,
            "frames": shards[-1]["stop"] if shards else 0,
            "failures": failures.get(key, 0),
            "error": m.get("error"),
            "outputs": [o["url"] for o in record.outputs.values()] if record else [],
            "worst_seam": worst_seam(record.seams if record else []),  # None: no overlap, or not done yet
            "seam_disagreement_max": seam_summary(record.seams)["max"] if record else None,
        }
    for key, m in ((manifest or {}).get("videos") or {}).items():  # failed before planning (probe errors)
        if key not in videos:
            videos[key] = {"url": m["url"], "status": m["status"], "shards_done": 0, "shards": 0, "frames_done": 0,
                           "frames": m.get("frames") or 0, "failures": 0, "error": m.get("error"), "outputs": [],
                           "worst_seam": None, "seam_disagreement_max": None}
    doc.update(state="finished" if manifest else "running or interrupted", videos=videos)
    if manifest:
        doc["report"] = ledger.url(REPORT_NAME)
    return doc
