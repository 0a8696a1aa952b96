"""One video of a run: what the driver knows of it, and the calls its units become.

No Ray here: a ``VideoRun`` holds the probe, the shards and units (``farm.graph``), the finished shard
records, the pieces each output is joined from, and the ObjectRefs of handed-off state (opaque values
to this module). ``shard_task`` and ``video_context`` build what an actor needs for one unit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from actors.base import VideoContext
from farm import storage
from farm.graph import Kind, Unit
from farm.inputs import VideoInput
from farm.ledger import Ledger, ShardRecord, core_pieces
from farm.plan import Shard
from farm.sinks import OutputTarget, SinkError
from farm.spec import FORMAT_EXT, JobSpec
from farm.worker import ShardTask


@dataclass
class VideoRun:
    input: VideoInput
    info: Any = None  # farm.video.VideoInfo once probed
    shards: list[Shard] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    targets: dict[str, OutputTarget] = field(default_factory=dict)
    status: str = "waiting"  # waiting | running | succeeded | failed | skipped
    error: str | None = None
    cond_ref: Any = None  # the prepare call's result, passed to every shard by reference
    records: dict[int, ShardRecord] = field(default_factory=dict)  # shard position -> its record
    state_refs: dict[int, Any] = field(default_factory=dict)  # shard position -> state it handed on
    partials: dict[int, ShardRecord] = field(default_factory=dict)  # checkpointed shards, continued from stopped_at
    pieces: dict[str, list[dict]] = field(default_factory=dict)  # channel -> piece records
    outputs: dict[str, dict] = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0
    fingerprint: str | None = None  # input size + etag/mtime: a changed input is rendered again
    seams: list[dict] = field(default_factory=list)  # farm.stitch.seam_disagreement per overlap and output

    @property
    def key(self) -> str:
        return self.input.key

    def unit(self, uid: str) -> Unit:
        return next(u for u in self.units if u.id == uid)

    def start_clock(self) -> VideoRun:
        """At each dispatch of its units: a video's seconds run from the first to its commit, its render time,
        not the model's load or the videos before it in a batch (the job's own seconds hold those)."""
        if not self.started:
            self.started = time.time()
        return self

    def elapsed(self) -> float:
        return time.time() - self.started if self.started else 0.0

    def state_sources(self) -> set[int]:
        """Positions of the shards whose state another shard starts from."""
        by_id = {u.id: u for u in self.units}
        return {by_id[u.state_from].shard for u in self.units if u.state_from}  # type: ignore[misc]

    def add_record(self, i: int, record: ShardRecord) -> None:
        """A finished shard: its record, and its core segments (two when it was checkpointed) as pieces of each
        output it makes."""
        self.records[i] = record
        self.partials.pop(i, None)
        for ch in self.targets:
            if ch in record.channels:  # pass 1 of a two-pass model makes no output pieces
                self.pieces[ch].extend(core_pieces(record.channels[ch]))

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "url": self.input.url,
            "status": self.status,
            "error": self.error,
            "frames": self.info.frame_count if self.info else None,
            "fps": f"{self.info.fps_num}/{self.info.fps_den}" if self.info else None,
            "shards": len(self.shards),
            "outputs": self.outputs,
            "seconds": round(self.seconds, 3),
            "seams": sorted(self.seams, key=lambda m: (m["start"], m["output"])),
        }


def output_url(spec: JobSpec, video: VideoInput, channel: str) -> str:
    """The final key of one channel, checked to stay under the template's static prefix."""
    ext = FORMAT_EXT[spec.output.format]
    rel_template = spec.output.uri[len(storage.static_prefix(spec.output.uri)) :].lstrip("/")
    rel = rel_template.format(job=spec.name, stem=video.stem, channel=channel, ext=ext)
    if not ext and rel.endswith("."):
        rel = rel[:-1]
    return storage.safe_join(storage.static_prefix(spec.output.uri), rel)


def make_targets(spec: JobSpec, run: VideoRun, ledger: Ledger) -> None:
    """Where each output channel of the video goes, and where its pieces wait until the commit."""
    from farm.channels import components

    for ch in spec.output.channels:
        colour = ch in ("fgr", "comp", "rgb", "rgba")
        run.targets[ch] = OutputTarget(
            url=output_url(spec, run.input, ch),
            parts_url=ledger.parts_url(run.key, ch),
            format=spec.output.format,
            fps_num=run.info.fps_num,
            fps_den=run.info.fps_den,
            width=run.info.width,
            height=run.info.height,
            components=components(ch),
            quality=spec.output.quality,
            preset=spec.output.preset,
            audio_from=run.input.url if (colour and spec.output.audio and run.info.has_audio) else None,
            storage_options=spec.storage_options,
        )
        run.pieces[ch] = []


def background_of(spec: JobSpec, run: VideoRun) -> tuple[float, float, float] | str:
    """What ``comp`` goes over for this video: its manifest's ``background`` column, else the spec's."""
    return run.input.params.get("background", spec.output.background)


def video_context(spec: JobSpec, run: VideoRun) -> VideoContext:
    return VideoContext(
        url=run.input.url,
        frame_count=run.info.frame_count,
        width=run.info.width,
        height=run.info.height,
        fps=float(run.info.fps),
        params={**spec.model.params, **run.input.params},  # manifest columns win
        storage_options=spec.storage_options,
    )


def handoff_at(run: VideoRun, i: int, passes: int, mode: str) -> int | None:
    """The frame at which shard ``i`` captures the state its chain's next shard starts from (handoff only)."""
    n = len(run.shards) // passes
    return run.shards[i + 1].start if mode == "handoff" and run.shards[i].stage == 0 and i + 1 < n else None


def shard_task(spec: JobSpec, run: VideoRun, unit: Unit, model_cls: Any, mode: str, ledger: Ledger,
               tag: str = "", order: int = 0) -> tuple[ShardTask, int | None]:
    """The task of a render or refine unit, and the position whose handed-off state it starts from;
    ``order`` is its place in the dispatches (the attempt id)."""
    i = unit.shard
    assert i is not None and unit.kind in (Kind.RENDER, Kind.REFINE)
    s = run.shards[i]
    n = len(run.shards) // model_cls.passes
    state_from = run.unit(unit.state_from).shard if unit.state_from else None
    state_url, partial = None, run.partials.get(i)
    if partial is not None:  # checkpointed: continue from its frame k with its state there
        state_url, state_from = partial.state_url, None
    elif state_from is not None and state_from not in run.state_refs:  # resumed: the ledger has it
        state_url = run.records[state_from].state_url
    previous = []
    if s.stage == 1:  # pass 1's output of this shard and its neighbours
        previous = [
            {"start": run.shards[k].start, "stop": run.shards[k].stop, "url": run.records[k].previous}
            for k in range(max(s.index - 1, 0), min(s.index + 2, n))
        ]
    task = ShardTask(
        job_id=spec.job_id,
        video_key=run.key,
        url=run.input.url,
        shard=s,
        targets=run.targets,
        ledger_root=ledger.root,
        handoff_at=handoff_at(run, i, model_cls.passes, mode),
        state_url=state_url,
        chunk=model_cls.chunk_frames,
        background=background_of(spec, run),
        storage_options=spec.storage_options,
        tag=tag,
        resume_from=partial.stopped_at if partial is not None else None,
        passes=model_cls.passes,
        previous=previous,
        blend=spec.window.blend,
        order=order,
    )
    return task, state_from


def check_plan(run: VideoRun, i: int, record: ShardRecord) -> None:
    """Every segment holds exactly the frames its plan gives it (av1an#770): else a retried error. A shard's
    core pieces (two when it was checkpointed and continued) follow each other from ``core_start`` to
    ``core_stop``, or to ``stopped_at`` for a partial record."""
    s = run.shards[i]
    stop = s.core_stop if record.stopped_at is None else record.stopped_at
    for ch, entry in record.channels.items():
        pieces = core_pieces(entry)
        at = s.core_start
        for p in pieces:
            if p["start"] != at:
                raise SinkError(f"{run.input.url}: shard {i} {ch} segment starts at frame {p['start']}, "
                                f"the plan says {at}")
            at += p["frames"]
        if at - s.core_start != stop - s.core_start:
            raise SinkError(
                f"{run.input.url}: shard {i} {ch} segment has {at - s.core_start} frames, "
                f"the plan says {stop - s.core_start}"
            )


def shard_record(run: VideoRun, i: int, record: ShardRecord) -> ShardRecord:
    """A shard attempt's record, joined to the partial record it continued (a checkpoint), checked against the
    plan, stamped with the input it was rendered from."""
    if record.resumed_from is not None:
        if i not in run.partials:
            raise ValueError(f"shard {i}: continued from frame {record.resumed_from}, no partial record")
        record = run.partials[i].join(record)
    check_plan(run, i, record)
    record.input = run.fingerprint
    return record
