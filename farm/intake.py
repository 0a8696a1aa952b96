"""Steps 1 to 4 of a run, before anything renders: the inputs, their probes, their work graphs, and
what the ledger says is done already. Each fails a video (``fail``) rather than the job, but for an
output prefix that cannot be written at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from farm import storage
from farm.channels import Background, BackgroundError
from farm.errors import JobError, one_line
from farm.events import EventKind
from farm.graph import build_graph, check_limits, video_shards
from farm.inputs import expand_inputs
from farm.ledger import Ledger
from farm.plan import PlanError, resolve_window
from farm.policy import Failure
from farm.pool import run_tasks
from farm.spec import JobSpec
from farm.video_run import VideoRun, background_of, make_targets, output_url

Fail = Callable[[VideoRun, str], None]
Event = Callable[..., None]


def open_inputs(spec: JobSpec, ledger: Ledger, fail: Fail, event: Event) -> tuple[dict[str, VideoRun], list[str]]:
    """1. The job's videos, and the ledger's first write: an output prefix that cannot be written stops the
    job here, with one line naming ``output.uri``."""
    so = spec.storage_options
    videos, errors = expand_inputs(spec.inputs, so)
    try:
        ledger.write_spec(spec.public_dict())
    except storage.StorageError as e:
        prefix = storage.redact(storage.static_prefix(spec.output.uri), spec.storage_options)
        line = one_line(e, spec.storage_options)
        errno_text = re.search(r"\[Errno \d+\] ([^:]+)", line)  # "No such file or directory"
        reason = errno_text.group(1) if errno_text else line
        raise JobError(f"output.uri: cannot write under {prefix} ({reason})") from None
    for line in errors:
        event(EventKind.INPUT_ERROR, error=line)
    runs: dict[str, VideoRun] = {}
    seen_outputs: dict[str, str] = {}
    for v in videos:
        run = runs[v.key] = VideoRun(v)
        first = output_url(spec, v, spec.output.channels[0])
        if first in seen_outputs:
            fail(run, f"{v.url}: output {first} is also the output of {seen_outputs[first]} (same stem)")
        seen_outputs[first] = v.url
    return runs, errors


def probe_all(spec: JobSpec, runs: list[VideoRun], fail: Fail) -> None:
    """2. Probe every video at once (Ray tasks: the input may be where only the cluster can read it)."""
    from farm.video import probe

    runs = [r for r in runs if r.status == "waiting"]
    calls = [(f"{spec.job_id}/{r.key}/probe", (r.input.url, spec.storage_options)) for r in runs]
    lim = spec.limits
    for run, info in zip(runs, run_tasks(probe, calls, spec.storage_options), strict=True):
        if isinstance(info, Failure):
            fail(run, info.message)
            continue
        run.info = info
        refused = check_limits(run.input.url, info.frame_count, info.width, info.height, lim.max_frames,
                               lim.max_pixels)
        if refused:
            fail(run, refused)


def check_backgrounds(spec: JobSpec, runs: list[VideoRun], fail: Fail) -> None:
    """2. A background image/video that cannot be read fails its videos now, not shard by shard."""
    if "comp" not in spec.output.channels:
        return
    seen: dict[str, str | None] = {}
    for run in runs:
        bg = background_of(spec, run)
        if run.status != "waiting" or not isinstance(bg, str):
            continue
        if bg not in seen:
            try:
                Background(bg, 1, 1, spec.storage_options).close()
                seen[bg] = None
            except BackgroundError as e:
                seen[bg] = storage.redact(str(e), spec.storage_options)
        if seen[bg]:
            fail(run, f"{run.input.url}: {seen[bg]}")


def build_graphs(spec: JobSpec, runs: list[VideoRun], model_cls: Any, ledger: Ledger, fail: Fail) -> str:
    """3. Every video's shards and units (``farm.graph``), saved as the plan; returns the state mode."""
    mode, frames, overlap, preroll = resolve_window(spec.window, model_cls.window)
    plan_doc = {}
    channels = list(spec.output.channels)
    for run in runs:
        if run.status != "waiting":
            continue
        try:
            p = model_cls.passes
            run.shards = video_shards(run.key, run.info.frame_count, frames, overlap, preroll, p)
            run.units = build_graph(run.key, run.shards, mode, p, channels)
        except PlanError as e:
            fail(run, f"{run.input.url}: {e}")
            continue
        make_targets(spec, run, ledger)
        plan_doc[run.key] = {"url": run.input.url, "shards": [s.to_dict() for s in run.shards]}
    ledger.write_plan({"mode": mode, "videos": plan_doc})
    return mode


def load_done_records(spec: JobSpec, runs: list[VideoRun], ledger: Ledger, force: bool, event: Event) -> None:
    """4. Resume: finished videos are skipped; finished shards of unfinished videos are not rendered again."""
    from farm.manifest_inputs import input_fingerprint

    for run in runs:
        if run.status != "waiting":
            continue
        run.fingerprint = input_fingerprint(run.input.url, spec.storage_options, run.input.params)
        done = ledger.read_video(run.key)
        if done and done.input != run.fingerprint:
            done = None  # the input changed since it was rendered (or was never fingerprinted)
        if done and not force and all(storage.exists(o["url"], spec.storage_options) for o in done.outputs.values()):
            run.status, run.outputs, run.seconds, run.seams = "skipped", done.outputs, 0.0, list(done.seams)
            continue
        records = {} if force else ledger.shard_records(run.key)
        for i, rec in sorted(records.items()):
            if i < len(run.shards) and rec.shard == run.shards[i].to_dict() and rec.input == run.fingerprint:
                run.add_record(i, rec)
        partials = {} if force else ledger.partial_records(run.key)  # checkpointed shards: continued from k
        for i, rec in sorted(partials.items()):
            if i not in run.records and i < len(run.shards) and rec.shard == run.shards[i].to_dict() \
                    and rec.input == run.fingerprint:
                run.partials[i] = rec
        if run.records or run.partials:
            more = {"shards_partial": {i: p.stopped_at for i, p in run.partials.items()}} if run.partials else {}
            event(EventKind.RESUMED, video=run.key, shards_done=sorted(run.records), **more)
