"""Run a job: probe, graph, resume, then feed the scheduler what the actor pool reports until every video
is done; blends and commits run as the graph makes them ready; the manifest and report come last.

The driver holds only small records. Actors decode their own frames and write their pieces to storage;
handed-off state travels actor to actor as an ObjectRef. Who runs what is ``farm.schedule``'s decision
(pure); the Ray calls are ``farm.pool``'s; this module connects the two and keeps the books.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm import intake
from farm.assemble import blend_overlap, commit_output
from farm.channels import missing_outputs
from farm.drain import apply_drains
from farm.errors import JobError, one_line
from farm.events import EventKind, EventLog, progress_subscriber
from farm.graph import Kind
from farm.ledger import Ledger, ShardRecord, VideoRecord, ledger_root
from farm.metrics import JobMetrics, LedgerCopy
from farm.plan import resolve_window
from farm.pool import Beat, Done, Failed, Loaded, LoadFailed, PingFailed, Pool, ensure_ray, failure
from farm.report import RunCounts, write_report
from farm.schedule import (
    ActorState,
    Cancel,
    Checkpoint,
    Command,
    Config,
    Dispatch,
    Emit,
    FailVideo,
    FinishVideo,
    Kill,
    Launch,
    Ping,
    Prefetch,
    Replace,
    Scheduler,
)
from farm.sinks import SinkError
from farm.spec import JobSpec, absolute_local_paths
from farm.video_run import VideoRun, handoff_at, output_url, shard_record, shard_task, video_context
from farm.worker import ModelConfig

log = logging.getLogger("farm")
NODES_EVERY_S = 5.0  # how often the scheduler learns which nodes are alive (node blocklists need another)
DRAINS_EVERY_S = 1.0  # how often the GCS is asked which nodes are draining (a notice can be 30 s or less)

__all__ = ["JobError", "JobResult", "JobRunner", "absolute_local_paths", "ensure_ray", "ledger_root",
           "output_url", "resolve_window", "run_job"]


@dataclass
class JobResult:
    job_id: str
    manifest: dict[str, Any]
    manifest_url: str
    report_url: str | None = None  # the Parquet run report (farm.report), one row per video

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.manifest["videos"].items() if v["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


Progress = Callable[[str, dict[str, Any]], None]  # (event, data)


class JobRunner:
    """One run of one job. ``run()`` returns when every video has succeeded or failed."""

    def __init__(self, spec: JobSpec, progress: Progress | None = None, force: bool = False) -> None:
        from actors import load_model_class

        self.spec, self.so, self.force = spec, spec.storage_options, force
        self.model_cls = load_model_class(spec.model.name)
        self.ledger = Ledger(ledger_root(spec), self.so)
        self.mode, self.frames, self.overlap, self.preroll = resolve_window(spec.window, self.model_cls.window)
        for ch in spec.output.channels:
            missing = missing_outputs(ch, self.model_cls.outputs)
            if missing:
                raise JobError(
                    f"output.channels: {ch!r} needs {missing} which model {spec.model.name!r} does not produce"
                )
        self.videos: dict[str, VideoRun] = {}
        self.log = EventLog()
        if progress:
            self.log.subscribe(progress_subscriber(progress))
        try:
            self.log.subscribe(JobMetrics(spec.job_id, spec.model.name, self.so).on_event, side=True)
        except Exception as exc:  # e.g. Ray not initialized: the job still runs
            log.warning("farm: metrics disabled (%s)", exc)
        self.ledger_copy = LedgerCopy(self.ledger, self.log)
        self.log.subscribe(self.ledger_copy.on_event, side=True)
        self.counts = RunCounts()
        self.log.subscribe(self.counts.on_event)
        self.pool: Pool | None = None
        self.sched: Scheduler | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The run's event log: ``{"t", "event", **data}`` per event, in order."""
        return self.log.events

    @property
    def actors(self) -> list[Any]:
        """The actor handle of each pool slot; None where the slot gets no more work."""
        if self.pool is None or self.sched is None:
            return []
        return [a if self.sched.actors[k].state != ActorState.GONE else None for k, a in enumerate(self.pool.actors)]

    def event(self, kind: EventKind | str, **data: Any) -> None:
        self.log.publish(kind, **data)

    def fail_video(self, run: VideoRun, message: str) -> None:
        if run.status in ("failed", "succeeded"):
            return
        if not message.startswith(run.input.url):  # a model's or worker's own words: say which video
            message = f"{run.input.url}: {message}"
        run.status, run.error = "failed", message
        run.seconds = run.elapsed()
        self.event(EventKind.VIDEO_FAILED, video=run.key, error=message)

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> JobResult:
        try:
            return self._run()
        finally:  # on failure too: the event log says what the scheduler saw (deaths, hangs, blocklists)
            try:
                if self.ledger_copy.enabled:
                    self.ledger_copy.flush()
            except Exception as e:  # never hide the run's own error behind the log's
                log.warning("could not write events.json: %s", one_line(e, self.so))

    def _run(self) -> JobResult:
        t_start = time.time()
        # 1. Inputs, and the ledger's first write: an output prefix that cannot be written stops the job here.
        try:
            self.videos, errors = intake.open_inputs(self.spec, self.ledger, self.fail_video, self.event)
        except JobError:
            self.ledger_copy.enabled = False  # nothing can be written there, the event log neither
            raise
        runs = list(self.videos.values())
        # 2. Probe every video (frames, size, limits) and check the backgrounds once.
        intake.probe_all(self.spec, runs, self.fail_video)
        intake.check_backgrounds(self.spec, runs, self.fail_video)
        # 3. The work graph of every video, saved as the plan.
        intake.build_graphs(self.spec, runs, self.model_cls, self.ledger, self.fail_video)
        # 4. Resume: what the ledger says is done is not rendered again.
        intake.load_done_records(self.spec, runs, self.ledger, self.force, self.event)
        # 5. Render: pool.wait -> schedule -> pool.apply, until every video is committed or failed.
        todo = [r for r in self.videos.values() if r.status == "waiting"]
        passes = self.model_cls.passes  # the bar counts frames rendered, once per pass
        self.event(EventKind.START, job=self.spec.job_id, videos={r.key: r.info.frame_count * passes for r in todo},
                   shards={r.key: len(r.shards) - len(r.records) for r in todo})
        if todo:
            self.render(todo)
        # 6. The manifest, written last (the report follows in run_job).
        manifest = self.manifest(t_start, errors)
        url = self.ledger.write_manifest(manifest)
        self.event(EventKind.FINISH, **manifest)
        return JobResult(self.spec.job_id, manifest, url)

    # ---- rendering: the loop ----------------------------------------------------------------

    def render(self, todo: list[VideoRun]) -> None:
        sch, r = self.spec.scheduler, self.spec.resources
        config = Config(
            retries=self.spec.retries,
            # copies of a straggler only where a shard's output does not depend on another's state
            speculative=self.mode != "handoff" and sch.speculative is not False,
            heartbeat_s=sch.heartbeat_s,
            stall_s=sch.stall_s,
            blocklist_after=sch.blocklist_after,
            max_failed_shards=self.spec.max_failed_shards,
            # a queued shard decodes ahead itself; a chain's next one cannot queue before its state exists
            prefetch=self.model_cls.chunk_frames is not None and (self.mode == "handoff" or sch.shards_per_actor == 1),
            preemption=sch.preemption,
            drain_min_deadline_s=sch.drain_min_deadline_s,
            handoff=self.mode == "handoff",
            queue=sch.shards_per_actor,
        )
        self.sched = Scheduler(config, r.actors)
        for run in sorted(todo, key=lambda v: -v.info.frame_count):  # longest first: no long tail (av1an)
            run.status = "running"  # its clock starts at its first dispatch (``apply``)
            done = {run.shards[i].name for i in run.records}
            self.sched.add_video(run.key, run.units, run.info.frame_count, done)
        m = self.spec.model
        model = ModelConfig(m.name, dict(m.params), m.weights, m.device, m.dtype, r.gpu_memory_gb)
        self.pool = Pool(self.spec.job_id, model, r, self.so, self.spec.retries, sch.shards_per_actor)
        self.pool.start(r.actors)
        try:
            self.loop()
        finally:
            try:
                for info in self.pool.wait_for_aborts(sch.heartbeat_s or 30.0):
                    self.event(EventKind.COPY_STOPPED, **info)
            except Exception as e:  # never hide the run's own error behind this one
                log.warning("cancelled copies not confirmed stopped: %s", one_line(e, self.so))
            self.pool.shutdown()

    def loop(self) -> None:
        pool, sched = self.pool, self.sched
        assert pool is not None and sched is not None
        refusals: list[str] = []
        nodes_at = drains_at = -math.inf
        drain_every = min(self.spec.scheduler.heartbeat_s or DRAINS_EVERY_S, DRAINS_EVERY_S)
        while True:
            now = time.monotonic()
            if now - nodes_at > NODES_EVERY_S:
                sched.on_nodes(pool.alive_nodes())
                nodes_at = now
            if now - drains_at >= drain_every:
                apply_drains(sched, pool.draining_nodes(), now, pool.alive_nodes)
                drains_at = now
            self.apply(sched.decide(now))
            if sched.finished:
                return
            for c in pool.wait(timeout=1.0):
                now = time.monotonic()
                if isinstance(c, Loaded):
                    sched.on_actor_ready(c.slot, c.info, c.generation)
                elif isinstance(c, LoadFailed):
                    refusals.append(c.failure.message)
                    sched.on_actor_lost(c.slot, c.failure, c.generation)
                elif isinstance(c, Beat):
                    sched.on_beat(c.slot, c.generation, c.beat, now)
                elif isinstance(c, PingFailed):
                    sched.on_actor_lost(c.slot, c.failure, c.generation)
                elif isinstance(c, Done):
                    self.on_done(c, now)
                elif isinstance(c, Failed):
                    sched.on_nodes(pool.alive_nodes())  # a failure may blocklist a node: only if another is up
                    nodes_at = now
                    sched.on_failed(c.attempt, c.failure, now)
            if not sched.ever_ready and sched.all_actors_gone():
                self.apply(sched.pending())  # the refusals' events
                self.refused(refusals)

    def refused(self, errors: list[str]) -> None:
        n, budget = self.spec.resources.actors, self.spec.resources.gpu_memory_gb
        if budget is not None and any("resources.gpu_memory_gb" in e for e in errors):
            raise JobError(
                f"resources.gpu_memory_gb: model {self.spec.model.name!r} does not fit the per-actor memory "
                f"budget of {budget} GiB on any of {n} actors: {errors[0]}"
            )
        raise JobError(f"model {self.spec.model.name!r} did not load on any actor: {errors[0]}")

    def on_done(self, c: Done, now: float) -> None:
        """A unit finished: keep what it made, then tell the scheduler (which may cancel its other copy)."""
        sched = self.sched
        assert sched is not None
        a = sched.attempts[c.attempt]
        run = self.videos[a.video]
        unit = a.unit
        seconds = 0.0
        if a.abandoned or run.status != "running":
            pass
        elif unit.kind == Kind.PREPARE:
            run.cond_ref = c.ref
        elif unit.kind in (Kind.RENDER, Kind.REFINE):
            i = unit.shard
            assert i is not None
            try:
                record = shard_record(run, i, ShardRecord.from_dict(c.value))
            except (SinkError, ValueError) as e:
                sched.on_failed(c.attempt, failure(e, self.so), now)
                return
            if record.stopped_at is not None:  # checkpointed on a draining node: continued from there
                run.partials[i] = record
                self.ledger.mark_shard_partial(run.key, i, record)
                sched.on_checkpointed(c.attempt, record.stopped_at, now)
                return
            run.add_record(i, record)
            if i in run.state_sources():
                run.state_refs[i] = c.state  # the next shard of the chain takes it
            if unit.state_from:
                run.state_refs.pop(run.unit(unit.state_from).shard, None)  # consumed: the object store frees it
            self.ledger.mark_shard_done(run.key, i, record)
            s = run.shards[i]
            self.event(EventKind.SHARD_DONE, video=run.key, shard=i, actor=a.slot, frames=s.stop - s.core_start,
                       seconds=record.seconds)
            seconds = record.seconds - ((record.stages or {}).get("queued_s") or 0.0)  # its own render time
        elif unit.kind == Kind.BLEND:
            piece = dict(c.value)
            seam = {"output": unit.channel, **piece.pop("seam")}  # measured by the blend, not committed
            run.seams.append(seam)
            self.event(EventKind.SEAM_MEASURED, video=run.key, **seam)
            run.pieces[unit.channel].append(piece)  # type: ignore[index]
        elif unit.kind == Kind.COMMIT:
            run.outputs[unit.channel] = c.value  # type: ignore[index]
        sched.on_done(c.attempt, now, seconds)

    def apply(self, commands: list[Command]) -> None:
        """Carry out the scheduler's commands in order, through the pool."""
        pool = self.pool
        assert pool is not None
        for cmd in commands:
            if isinstance(cmd, Emit):
                self.event(cmd.kind, **cmd.data)
            elif isinstance(cmd, Dispatch):
                run = self.videos[cmd.video].start_clock()
                if cmd.unit.kind == Kind.PREPARE:
                    ctx = video_context(self.spec, run)
                    pool.submit(cmd.attempt, cmd.slot, "prepare", ctx, name=f"{self.spec.job_id}/{run.key}/prepare")
                    continue
                task, state_from = shard_task(self.spec, run, cmd.unit, self.model_cls, self.mode, self.ledger, cmd.tag,
                                              cmd.attempt)
                state_ref = run.state_refs.get(state_from) if state_from is not None else None
                pool.submit(cmd.attempt, cmd.slot, "render_shard", task, run.cond_ref, state_ref,
                            name=task.name + task.tag, returns=2)
            elif isinstance(cmd, Prefetch):
                run, i = self.videos[cmd.video], cmd.unit.shard
                pool.prefetch(cmd.slot, run.input.url, run.shards[i],
                              handoff_at(run, i, self.model_cls.passes, self.mode))
            elif isinstance(cmd, Launch):
                self.launch(cmd)
            elif isinstance(cmd, Cancel):
                pool.cancel(cmd.attempt, {"video": cmd.video, "shard": cmd.shard, "actor": cmd.slot})
            elif isinstance(cmd, Checkpoint):
                pool.checkpoint(cmd.attempt)
            elif isinstance(cmd, Ping):
                pool.ping(cmd.slot, cmd.generation)
            elif isinstance(cmd, Kill):
                pool.kill(cmd.slot)
            elif isinstance(cmd, Replace):
                pool.replace(cmd.slot, cmd.generation, cmd.avoid_nodes)
            elif isinstance(cmd, FailVideo):
                self.fail_video(self.videos[cmd.video], cmd.message)
            elif isinstance(cmd, FinishVideo):
                self.finish_video(self.videos[cmd.video])

    def launch(self, cmd: Launch) -> None:
        """A blend (one overlap of one channel) or a commit (one output), as a small task."""
        assert self.pool is not None
        run, unit = self.videos[cmd.video].start_clock(), cmd.unit
        ch, target = unit.channel, run.targets[unit.channel]  # type: ignore[index]
        name = f"{self.spec.job_id}/{run.key}/{unit.id}"
        if unit.kind == Kind.BLEND:
            last = len(run.shards) - len(run.shards) // self.model_cls.passes  # position of the last pass's first
            a, b = run.records[last + unit.shard].channels[ch], run.records[last + unit.shard + 1].channels[ch]
            self.pool.run_task(cmd.attempt, blend_overlap, target, f"blend-{unit.shard:04d}", unit.frames[0],
                               a["tail"], b["head"], self.spec.window.blend, name=name)
        else:
            self.pool.run_task(cmd.attempt, commit_output, target, run.pieces[ch], name=name)

    def finish_video(self, run: VideoRun) -> None:
        if run.status != "running":
            return
        run.status, run.seconds = "succeeded", run.elapsed()
        self.ledger.write_video(run.key, VideoRecord(run.input.url, run.outputs, run.fingerprint, run.seams))
        self.event(EventKind.VIDEO_DONE, video=run.key, seconds=run.seconds,
                   outputs=sorted(o["url"] for o in run.outputs.values() if o.get("url")))

    def manifest(self, t_start: float, input_errors: list[str]) -> dict[str, Any]:
        return {
            "job": self.spec.job_id,
            "name": self.spec.name,
            "model": self.spec.model.name,
            "state_mode": self.mode,
            "started": t_start,
            "seconds": round(time.time() - t_start, 3),
            "input_errors": input_errors,
            "videos": {run.key: run.manifest_entry() for run in self.videos.values()},
            "drained_nodes": list(self.counts.drained),
            "frames_rerendered": sum(self.counts.rerendered.values()),
        }


def run_job(
    spec: JobSpec, address: str | None = None, progress: Progress | None = None, force: bool = False
) -> JobResult:
    """Run a job to completion on a local embedded Ray (or the cluster at ``address``)."""
    spec = absolute_local_paths(spec)
    need = math.ceil(spec.resources.actors * spec.resources.cpus_per_actor) + 1
    ensure_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, need))
    runner = JobRunner(spec, progress=progress, force=force)
    result = runner.run()
    fingerprints = {k: r.fingerprint for k, r in runner.videos.items()}
    result.report_url = write_report(runner.ledger, result, runner.counts, fingerprints)
    return result
