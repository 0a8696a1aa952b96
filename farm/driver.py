"""Run a job: probe, plan, dispatch shards to a pool of model actors, blend, assemble, commit.

The driver holds only small records. Actors decode their own frames and write their pieces to
storage; handed-off state travels actor to actor as an ObjectRef. Shards are dispatched by the driver
only when an actor is free and the shard's inputs are ready (never queued behind a blocked call), so a
dead actor holds no slot: it is replaced and its shard goes to another actor.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.base import ModelError, VideoContext
from farm import storage
from farm.assemble import blend_overlap, commit_output
from farm.channels import Background, BackgroundError, components, missing_outputs
from farm.inputs import VideoInput, expand_inputs
from farm.ledger import Ledger
from farm.plan import PlanError, Shard, output_pieces, plan_shards, refine_shards
from farm.sinks import OutputTarget, SinkError
from farm.spec import FORMAT_EXT, JobSpec, absolute_local_paths
from farm.worker import ModelConfig, ModelWorker, ShardTask

log = logging.getLogger("farm")
WorkerActor = ray.remote(ModelWorker)

# Errors about the input itself: retrying on another actor cannot help.
INPUT_ERRORS = (ModelError, PlanError, BackgroundError)
MAX_REPLACEMENTS = 5  # per actor slot and job


class JobError(RuntimeError):
    """The job as a whole cannot run (e.g. the model does not load on any actor)."""


@dataclass
class VideoRun:
    input: VideoInput
    info: Any = None  # farm.video.VideoInfo once probed
    shards: list[Shard] = field(default_factory=list)
    targets: dict[str, OutputTarget] = field(default_factory=dict)
    status: str = "waiting"  # waiting | running | succeeded | failed | skipped
    error: str | None = None
    cond_ref: Any = None
    cond_ready: bool = False
    records: dict[int, dict] = field(default_factory=dict)
    state_refs: dict[int, Any] = field(default_factory=dict)  # shard i -> state for shard i+1
    pieces: dict[str, list[dict]] = field(default_factory=dict)  # channel -> piece records
    blends_sent: set[tuple[str, int]] = field(default_factory=set)
    outputs: dict[str, dict] = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0
    fingerprint: str | None = None  # input size + etag/mtime: a changed input is rendered again

    @property
    def key(self) -> str:
        return self.input.key


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


def resolve_window(spec: JobSpec, model_cls: type) -> tuple[str, int, int, int]:
    """(state mode, frames, overlap, preroll): the job's window over the model's defaults."""
    w, d = spec.window, model_cls.window
    mode = w.state if w.state != "auto" else d.state
    frames = w.frames or d.frames
    overlap = w.overlap if w.overlap is not None else d.overlap
    if mode == "handoff":
        overlap = 0  # the state carries the context exactly: overlapping would only render frames twice
    preroll = w.preroll if mode == "preroll" else 0
    return mode, frames, overlap, preroll


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address``, or start an embedded local Ray that listens on 127.0.0.1 only.

    A new local Ray takes the machine's network address as its node address and binds GCS, raylet,
    agents, metrics and workers there or on all interfaces (``ray.init(_node_ip_address="127.0.0.1")``
    is turned back into that address). Ray's single-machine mode, the default on macOS and Windows
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), makes the node address 127.0.0.1, and then every port
    is on loopback. Setting that variable yourself (``=1``) keeps Ray's own choice.
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    configured = var in os.environ
    was = ray_constants.ENABLE_RAY_CLUSTER
    if not configured:
        os.environ[var] = "0"  # read at import by the processes Ray starts (agents, workers)
        ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray already; read when init picks the IP
    try:
        # address="local": a new Ray of our own, never one that another process on this machine started
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    finally:
        if not configured:  # a later init in this process (another cluster) picks its address as usual
            ray_constants.ENABLE_RAY_CLUSTER = was
            os.environ.pop(var, None)


def output_url(spec: JobSpec, video: VideoInput, channel: str) -> str:
    """The final key of one channel, checked to stay under the template's static prefix."""
    ext = FORMAT_EXT[spec.output.format]
    rel_template = spec.output.uri[len(storage.static_prefix(spec.output.uri)) :].lstrip("/")
    rel = rel_template.format(job=spec.name, stem=video.stem, channel=channel, ext=ext)
    if not ext and rel.endswith("."):
        rel = rel[:-1]
    return storage.safe_join(storage.static_prefix(spec.output.uri), rel)


def ledger_root(spec: JobSpec) -> str:
    return storage.join(storage.static_prefix(spec.output.uri), ".farm", spec.job_id)


class JobRunner:
    """One run of one job. ``run()`` returns when every video has succeeded or failed."""

    def __init__(self, spec: JobSpec, progress: Progress | None = None, force: bool = False) -> None:
        from actors import load_model_class

        self.spec = spec
        self.so = spec.storage_options
        from farm.metrics import with_listeners

        self.progress = with_listeners(self, progress)  # metrics always see the events
        self.force = force
        self.model_cls = load_model_class(spec.model.name)
        self.ledger = Ledger(ledger_root(spec), self.so)
        self.mode, self.frames, self.overlap, self.preroll = resolve_window(spec, self.model_cls)
        for ch in spec.output.channels:
            missing = missing_outputs(ch, self.model_cls.outputs)
            if missing:
                raise JobError(
                    f"output.channels: {ch!r} needs {missing} which model {spec.model.name!r} does not produce"
                )
        self.videos: dict[str, VideoRun] = {}
        self.actors: list[Any] = []
        self.actor_failures: dict[int, int] = {}
        self.actor_nodes: dict[int, str] = {}  # slot -> Ray node id its current actor runs on
        self.node_failures: dict[str, list[tuple[int, int]]] = {}  # node -> (slot, generation) per failure
        self.blocked_nodes: set[str] = set()  # nodes whose actors failed blocklist_after shards of this job
        self.failed_shards = 0
        self.events: list[dict] = []
        self.retired: dict[int, str] = {}  # actor slot -> why it gets no more shards of this job
        self.aborts: dict[Any, dict[str, Any]] = {}  # abort-call ref -> the cancelled copy it stops
        self.ledger_writable = True  # False when the output prefix refused the ledger's first write

    # ---- planning ---------------------------------------------------------------------------

    def plan(self, run: VideoRun) -> None:
        run.shards = plan_shards(run.key, run.info.frame_count, self.frames, self.overlap, self.preroll)
        if self.model_cls.passes == 2:  # pass 2 (stage 1) shards follow at positions n..2n-1
            run.shards += refine_shards(run.shards)
        for ch in self.spec.output.channels:
            url = output_url(self.spec, run.input, ch)
            colour = ch in ("fgr", "comp", "rgb", "rgba")
            run.targets[ch] = OutputTarget(
                url=url,
                parts_url=storage.join(self.ledger.root, "parts", run.key, ch),
                format=self.spec.output.format,
                fps_num=run.info.fps_num,
                fps_den=run.info.fps_den,
                width=run.info.width,
                height=run.info.height,
                components=components(ch),
                quality=self.spec.output.quality,
                audio_from=run.input.url if (colour and self.spec.output.audio and run.info.has_audio) else None,
                storage_options=self.so,
            )
            run.pieces[ch] = []

    # ---- actors -----------------------------------------------------------------------------

    def _start_actor(self, slot: int, generation: int = 0) -> Any:
        m, r = self.spec.model, self.spec.resources
        config = ModelConfig(m.name, dict(m.params), m.weights, m.device, m.dtype, r.gpu_memory_gb)
        name = f"{self.spec.job_id}/actor-{slot}" + (f"-r{generation}" if generation else "")
        options = dict(
            num_cpus=r.cpus_per_actor,
            num_gpus=r.gpus_per_actor,
            resources=dict(r.custom) or None,  # custom node resources the autoscaler scales on
            max_concurrency=2,  # one shard at a time (the driver never sends two), plus ping/abort beside it
            max_restarts=0,  # the driver replaces dead actors itself, and knows which shard they held
        )
        if self.blocked_nodes:  # replacements keep off blocklisted nodes
            options["label_selector"] = {"ray.io/node-id": f"!in({','.join(sorted(self.blocked_nodes))})"}
        self.actor_nodes.pop(slot, None)
        try:
            return WorkerActor.options(name=name, **options).remote(config, self.so, slot)
        except ValueError:  # a name still held by an actor of an earlier run in this Ray session
            name = f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
            return WorkerActor.options(name=name, **options).remote(config, self.so, slot)

    def start_actors(self) -> None:
        """Start the pool and return as soon as one actor has loaded its model: the others join the
        schedule as they come up (``self.loading``), so a big pool's start-up overlaps rendering."""
        n = self.spec.resources.actors
        self.actors = [self._start_actor(k) for k in range(n)]
        self.generation = [0] * n
        self.loading = {a.info.remote(): k for k, a in enumerate(self.actors)}  # info ref -> slot
        self.ready: set[int] = set()
        errors: list[str] = []
        while self.loading and not self.ready:
            done, _ = ray.wait(list(self.loading), num_returns=1)
            error = self.actor_loaded(self.loading.pop(done[0]), done[0])
            if error:
                errors.append(error)
        if all(a is None for a in self.actors):
            budget = self.spec.resources.gpu_memory_gb
            if budget is not None and any("resources.gpu_memory_gb" in e for e in errors):
                raise JobError(
                    f"resources.gpu_memory_gb: model {self.spec.model.name!r} does not fit the per-actor memory "
                    f"budget of {budget} GiB on any of {n} actors: {errors[0]}"
                )
            raise JobError(f"model {self.spec.model.name!r} did not load on any actor: {errors[0]}")

    def actor_loaded(self, slot: int, info_ref: Any) -> str | None:
        """An actor's ``info()`` came back: it is ready, or it refused to start (returns why)."""
        try:
            info = ray.get(info_ref)
        except ray.exceptions.RayError as e:
            error = _one_line(e, self.so)
            self.actors[slot] = None
            self.retired[slot] = f"did not load: {error}"
            self.event("actor_refused", actor=slot, error=error)
            return error
        self.ready.add(slot)
        if info.get("node"):
            self.actor_nodes[slot] = info["node"]
        self.event("actor_ready", actor=slot, **info)
        return None

    def replace_actor(self, slot: int) -> None:
        if slot in self.retired:  # blocklisted or retired: its death needs no replacement
            self.actors[slot] = None
            return
        self.generation[slot] += 1
        if self.generation[slot] > MAX_REPLACEMENTS:  # it keeps dying: stop feeding it shards
            self.actors[slot] = None
            self.retired[slot] = f"died {self.generation[slot]} times"
            self.event("actor_retired", actor=slot)
            return
        self.actors[slot] = self._start_actor(slot, self.generation[slot])
        self.event("actor_replaced", actor=slot, generation=self.generation[slot])

    def charge_failure(self, slot: int) -> None:
        """A shard failed (or hung) on this actor: count it against the actor and against its node."""
        self.actor_failures[slot] = self.actor_failures.get(slot, 0) + 1
        node = self.actor_nodes.get(slot)
        if node:
            self.node_failures.setdefault(node, []).append((slot, self.generation[slot]))

    def blocklist_node(self, slot: int) -> list[int]:
        """Blocklist the node of ``slot`` once its actors failed ``blocklist_after`` shards, from more than
        one actor (one bad actor is the actor blocklist's business), while another node is alive: its
        actors are killed and replaced on other nodes, and actors the actor blocklist retired there (their
        failures were the node's) come back. Returns the slots to move (the caller replaces the idle ones;
        busy ones come back as deaths and are replaced then)."""
        node = self.actor_nodes.get(slot)
        failures = self.node_failures.get(node or "", [])
        if not node or node in self.blocked_nodes or len(failures) < self.spec.scheduler.blocklist_after:
            return []
        if len(set(failures)) < 2:
            return []
        if not {n["NodeID"] for n in ray.nodes() if n.get("Alive")} - self.blocked_nodes - {node}:
            return []  # the only node left: blocking it would stop the job, not route around a bad node
        self.blocked_nodes.add(node)
        self.event("node_blocklisted", node=node, failures=len(failures), actors=len(set(failures)))
        moved = []
        for k, n in list(self.actor_nodes.items()):
            if n != node:
                continue
            if self.actors[k] is not None:
                ray.kill(self.actors[k])
                moved.append(k)
            elif self.retired.get(k, "").startswith("blocklisted"):  # its failures were the node's: revive it
                del self.retired[k]
                self.actor_failures[k] = 0
                moved.append(k)
        return moved

    # ---- bookkeeping ------------------------------------------------------------------------

    def event(self, kind: str, **data: Any) -> None:
        e = {"t": time.time(), "event": kind, **data}
        self.events.append(e)
        self.progress(kind, e)

    def fail_video(self, run: VideoRun, message: str) -> None:
        if run.status in ("failed", "succeeded"):
            return
        if not message.startswith(run.input.url):  # a model's or worker's own words: say which video
            message = f"{run.input.url}: {message}"
        run.status, run.error = "failed", message
        run.seconds = time.time() - run.started if run.started else 0.0
        self.event("video_failed", video=run.key, error=message)

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> JobResult:
        try:
            return self._run()
        finally:  # on failure too: the event log says what the scheduler saw (deaths, hangs, blocklists)
            try:
                if self.ledger_writable:
                    self.ledger.write_json("events.json", self.events)
            except Exception as e:  # never hide the run's own error behind the log's
                log.warning("could not write events.json: %s", _one_line(e, self.so))

    def _run(self) -> JobResult:
        t_start = time.time()
        videos, errors = expand_inputs(self.spec.inputs, self.so)
        try:  # the ledger's first write: an output prefix that cannot be written stops the job here
            self.ledger.write_spec(self.spec.public_dict())
        except storage.StorageError as e:
            self.ledger_writable = False
            prefix = storage.redact(storage.static_prefix(self.spec.output.uri), self.so)
            line = _one_line(e, self.so)
            errno_text = re.search(r"\[Errno \d+\] ([^:]+)", line)  # "No such file or directory"
            reason = errno_text.group(1) if errno_text else line
            raise JobError(f"output.uri: cannot write under {prefix} ({reason})") from None
        for line in errors:
            self.event("input_error", error=line)
        seen_outputs: dict[str, str] = {}
        for v in videos:
            run = VideoRun(v)
            self.videos[v.key] = run
            first = output_url(self.spec, v, self.spec.output.channels[0])
            if first in seen_outputs:
                self.fail_video(run, f"{v.url}: output {first} is also the output of {seen_outputs[first]} (same stem)")
            seen_outputs[first] = v.url

        self.probe_all()
        self.check_backgrounds()
        plan_doc = {}
        for run in self.videos.values():
            if run.status == "waiting":
                try:
                    self.plan(run)
                    plan_doc[run.key] = {"url": run.input.url, "shards": [s.to_dict() for s in run.shards]}
                except PlanError as e:
                    self.fail_video(run, f"{run.input.url}: {e}")
        self.ledger.write_plan({"mode": self.mode, "videos": plan_doc})
        self.load_done_records()

        todo = [r for r in self.videos.values() if r.status == "waiting"]
        passes = self.model_cls.passes  # the bar counts frames rendered, once per pass
        self.progress("start", {"videos": {r.key: r.info.frame_count * passes for r in todo}, "job": self.spec.job_id})
        if todo:
            self.start_actors()
            try:
                self.schedule(todo)
            finally:
                try:
                    self.wait_for_aborts()
                except ray.exceptions.RayError as e:  # never hide the run's own error behind this one
                    log.warning("cancelled copies not confirmed stopped: %s", _one_line(e, self.so))
                for a in self.actors:
                    if a is not None:
                        ray.kill(a)
        manifest = self.manifest(t_start, errors)
        url = self.ledger.write_manifest(manifest)
        self.progress("finish", manifest)
        return JobResult(self.spec.job_id, manifest, url)

    def wait_for_aborts(self) -> None:
        """Before the actors are killed: every cancelled copy has acknowledged its abort, so none is
        killed halfway through writing a frame (png frames go straight to their final keys). A copy
        that does not answer within the heartbeat is hung, and killed like any hung actor."""
        if not self.aborts:
            return
        timeout = self.spec.scheduler.heartbeat_s or 30.0
        done, _ = ray.wait(list(self.aborts), num_returns=len(self.aborts), timeout=timeout)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                continue  # its actor died: nothing of it is writing any more
            self.event("copy_stopped", **self.aborts[ref])
        self.aborts.clear()

    def probe_all(self) -> None:
        from farm.video import probe

        probe_task = ray.remote(num_cpus=0)(probe)
        refs = {
            probe_task.options(name=f"{self.spec.job_id}/{r.key}/probe").remote(r.input.url, self.so): r
            for r in self.videos.values()
            if r.status == "waiting"
        }
        lim = self.spec.limits
        for ref, run in refs.items():
            try:
                run.info = ray.get(ref)
            except ray.exceptions.RayError as e:
                self.fail_video(run, _one_line(e, self.so))
                continue
            i = run.info
            if lim.max_frames is not None and i.frame_count > lim.max_frames:
                self.fail_video(
                    run, f"{run.input.url}: {i.frame_count} frames, over limits.max_frames={lim.max_frames}"
                )
            elif lim.max_pixels is not None and i.width * i.height > lim.max_pixels:
                self.fail_video(
                    run, f"{run.input.url}: {i.width}x{i.height} pixels, over limits.max_pixels={lim.max_pixels}"
                )

    def background_of(self, run: VideoRun) -> tuple[float, float, float] | str:
        """What ``comp`` goes over for this video: its manifest's ``background`` column, else the spec's."""
        return run.input.params.get("background", self.spec.output.background)

    def check_backgrounds(self) -> None:
        """A background image/video that cannot be read fails its videos now, not shard by shard."""
        if "comp" not in self.spec.output.channels:
            return
        seen: dict[str, str | None] = {}
        for run in self.videos.values():
            bg = self.background_of(run)
            if run.status != "waiting" or not isinstance(bg, str):
                continue
            if bg not in seen:
                try:
                    Background(bg, 1, 1, self.so).close()
                    seen[bg] = None
                except BackgroundError as e:
                    seen[bg] = storage.redact(str(e), self.so)
            if seen[bg]:
                self.fail_video(run, f"{run.input.url}: {seen[bg]}")

    def load_done_records(self) -> None:
        """Resume: finished videos are skipped; finished shards of unfinished videos are not rendered again."""
        for run in self.videos.values():
            if run.status != "waiting":
                continue
            from farm.manifest_inputs import input_fingerprint

            run.fingerprint = input_fingerprint(run.input.url, self.so, run.input.params)
            done = self.ledger.read_json(f"videos/{run.key}.json")
            if done and done.get("input") != run.fingerprint:
                done = None  # the input changed since it was rendered (or was never fingerprinted)
            if done and not self.force and all(storage.exists(o["url"], self.so) for o in done["outputs"].values()):
                run.status, run.outputs, run.seconds = "skipped", done["outputs"], 0.0
                continue
            records = {} if self.force else self.ledger.done_shards(run.key)
            run.records = {
                i: rec
                for i, rec in records.items()
                if i < len(run.shards)
                and rec.get("shard") == run.shards[i].to_dict()
                and rec.get("input") == run.fingerprint
            }
            for rec in run.records.values():
                for ch in self.spec.output.channels:
                    if ch in rec["channels"]:  # pass-1 records of a two-pass model have none
                        run.pieces[ch].append(rec["channels"][ch]["core"])
            if run.records:
                self.event("resumed", video=run.key, shards_done=sorted(run.records))

    # ---- scheduling -------------------------------------------------------------------------

    def ready_shards(self, run: VideoRun, in_flight: set[tuple[str, int]]) -> list[int]:
        """Shards whose inputs are available and that are neither done nor running."""
        if run.status != "running" or not run.cond_ready:
            return []
        out = []
        n = len(run.shards) // self.model_cls.passes  # shards per pass
        for i, s in enumerate(run.shards):
            if i in run.records or (run.key, i) in in_flight:
                continue
            if s.stage == 1:
                # A DAG, not a barrier: refine-k needs pass 1 of k-1, k, k+1 and refine-(k-1)'s state.
                pass1 = range(max(s.index - 1, 0), min(s.index + 2, n))
                if any(k not in run.records for k in pass1) or (s.index > 0 and i - 1 not in run.records):
                    continue
                out.append(i)
                continue
            if self.mode == "handoff" and i > 0 and i - 1 not in run.records:
                continue
            out.append(i)
            if self.mode == "handoff":
                break  # a chain has at most one runnable shard
        return out

    def schedule(self, runs: list[VideoRun]) -> None:
        r = self.spec.retries
        # Longest videos first, so the last actor does not idle on a long tail (av1an order).
        runs = sorted(runs, key=lambda v: -v.info.frame_count)
        for run in runs:
            run.status, run.started = "running", time.time()
        attempts: dict[tuple[str, int], int] = {}
        avoid: dict[tuple[str, int], set[int]] = {}
        in_flight: dict[Any, tuple[str, Any]] = {}  # ref -> (kind, payload)
        busy: dict[int, Any] = {}  # actor slot -> ref it is working on
        running_shards: set[tuple[str, int]] = set()
        prep_queue = [run for run in runs]
        counter = itertools.count()
        sch = self.spec.scheduler
        # Copies of a straggler only where a shard's output does not depend on another's state.
        speculative = self.mode != "handoff" and sch.speculative is not False
        copies: dict[tuple[str, int], list[Any]] = {}  # shard -> its attempts in flight (original, copy)
        started_at: dict[Any, float] = {}  # shard ref -> when it was dispatched
        copied: set[tuple[str, int]] = set()  # shards that already got their one copy
        per_frame: list[float] = []  # seconds per frame of finished shards: what "slow" means
        heart: dict[int, dict[str, Any]] = {}  # slot -> {actor, ref, sent, alive}
        max_call_s = 0.0  # longest single render call any actor reported
        killed: list[Any] = []  # handles of actors killed as hung (kept, so they are compared by identity)
        for ref, slot in self.loading.items():  # actors still loading their model: busy until info() returns
            in_flight[ref], busy[slot] = ("loading", slot), ref
        self.loading = {}

        hinted: dict[int, tuple[str, int]] = {}  # actor slot -> the shard it was told to prefetch

        def hint_next(slot: int, run: VideoRun, i: int) -> None:
            """Tell the actor the shard it most likely gets next, so it decodes its first chunks while this one
            finishes (in a handoff chain: before the state arrives). A hint: a wrong guess costs one decode."""
            if self.model_cls.chunk_frames is None:  # whole-window models: a second window in memory is too dear
                return
            taken = set(hinted.values())
            for j in range(i + 1, len(run.shards)):
                s = run.shards[j]
                if s.stage != run.shards[i].stage:
                    return
                if j in run.records or (run.key, j) in running_shards or (run.key, j) in taken:
                    continue
                handoff_at = run.shards[j + 1].start if self.mode == "handoff" and j + 1 < len(run.shards) else None
                self.actors[slot].prefetch.remote(run.input.url, s, handoff_at, self.so)
                hinted[slot] = (run.key, j)
                return

        def idle_slots() -> list[int]:
            return [k for k, a in enumerate(self.actors) if a is not None and k not in busy]

        def dispatch_shard(slot: int, run: VideoRun, i: int, copy: bool = False) -> None:
            s = run.shards[i]
            handoff_at = run.shards[i + 1].start if self.mode == "handoff" and i + 1 < len(run.shards) else None
            state_ref, state_url = None, None
            chained = self.mode == "handoff" or s.stage == 1  # pass 2 hands its noise down the chain
            if chained and s.index > 0:
                state_ref = run.state_refs.get(i - 1)
                state_url = run.records[i - 1].get("state_url") if state_ref is None else None
            previous = []
            if s.stage == 1:
                handoff_at = None  # refine returns the state for the next shard itself
                n = len(run.shards) // 2
                previous = [
                    {"start": run.shards[k].start, "stop": run.shards[k].stop, "url": run.records[k]["previous"]}
                    for k in range(max(s.index - 1, 0), min(s.index + 2, n))
                ]
            task = ShardTask(
                job_id=self.spec.job_id,
                video_key=run.key,
                url=run.input.url,
                shard=s,
                targets=run.targets,
                ledger_root=self.ledger.root,
                handoff_at=handoff_at,
                state_url=state_url,
                chunk=self.model_cls.chunk_frames,
                background=self.background_of(run),
                storage_options=self.so,
                tag=f".copy{attempts.get((run.key, i), 0)}" if copy else "",  # its own part names
                passes=self.model_cls.passes,
                previous=previous,
                blend=self.spec.window.blend,
            )
            rec_ref, st_ref = (
                self.actors[slot]
                .render_shard.options(name=task.name + task.tag, num_returns=2)
                .remote(task, run.cond_ref, state_ref)
            )
            key = (run.key, i)
            if not copy:  # a copy is not a retry: it spends none of the shard's attempts
                attempts[key] = attempts.get(key, 0) + 1
            in_flight[rec_ref] = ("shard", (run, i, slot, st_ref, task.name + task.tag))
            busy[slot] = rec_ref
            started_at[rec_ref] = time.monotonic()
            copies.setdefault(key, []).append(rec_ref)
            running_shards.add(key)
            kind = "shard_speculated" if copy else "shard_dispatched"
            self.event(kind, video=run.key, shard=i, actor=slot, attempt=attempts[key])
            for k in [k for k, v in hinted.items() if v == key]:
                del hinted[k]
            if not copy:
                hint_next(slot, run, i)

        def speculate(slots: list[int]) -> bool:
            """At the tail (nothing else to run), copy the slowest straggler to an idle actor."""
            if not speculative or not per_frame:
                return False
            rate = sorted(per_frame)[len(per_frame) // 2]  # median seconds per frame
            now, best = time.monotonic(), None
            for key, refs in copies.items():
                if key in copied or len(refs) != 1:
                    continue
                run, i = in_flight[refs[0]][1][:2]
                late = (now - started_at[refs[0]]) / max(1.5 * rate * run.shards[i].frames, 1e-3)
                free = [k for k in slots if k not in avoid.get(key, set())]
                if run.status == "running" and late > 1 and free and (best is None or late > best[0]):
                    best = (late, run, i, free[0])
            if best is None:
                return False
            _, run, i, slot = best
            copied.add((run.key, i))
            dispatch_shard(slot, run, i, copy=True)
            return True

        def cancel_copy(ref: Any, key: tuple[str, int]) -> None:
            """The other copy won: stop this one (it writes only its own part names) and free its actor when
            it has stopped; ``ray.cancel`` drops it if it had not started, ``abort`` stops it between chunks."""
            run, i, slot, st_ref, name = in_flight[ref][1]
            ray.cancel(ref)
            if self.actors[slot] is not None:
                self.aborts[self.actors[slot].abort.remote(name)] = {"video": run.key, "shard": i, "actor": slot}
            in_flight[ref] = ("abandoned", (slot, st_ref))
            self.event("shard_cancelled", video=run.key, shard=i, actor=slot, reason="another copy finished first")

        def blocklist_actor(slot: int) -> None:
            n = self.actor_failures.get(slot, 0)
            if n < sch.blocklist_after or slot in self.retired:
                return
            self.retired[slot] = f"blocklisted after {n} failed shards"
            actor, self.actors[slot] = self.actors[slot], None
            if actor is not None:
                ray.kill(actor)  # its in-flight work (if any) comes back as a death and is re-dispatched
            self.event("actor_blocklisted", actor=slot, failures=n)

        def blocklist(slot: int) -> None:
            blocklist_actor(slot)
            for k in self.blocklist_node(slot):
                if self.actors[k] is not None:
                    killed.append(self.actors[k])  # its death is on its way back: do not ping it
                heart.pop(k, None)
                if k not in busy:  # idle: no shard will report its death, so replace it here
                    self.replace_actor(k)

        def hung(slot: int, reason: str) -> None:
            """Kill a hung actor; its shard comes back as an actor death and goes to another actor."""
            ref = busy.get(slot)
            entry = in_flight.get(ref)
            data: dict[str, Any] = {}
            if entry and entry[0] == "shard":
                run, i = entry[1][:2]
                avoid.setdefault((run.key, i), set()).add(slot)
                data = {"video": run.key, "shard": i}
            self.event("actor_hung", actor=slot, reason=reason, **data)
            self.charge_failure(slot)
            actor = self.actors[slot]
            heart.pop(slot, None)
            if actor is not None:
                killed.append(actor)
                ray.kill(actor)
            if ref is None:  # idle: nothing will report the death, so replace it here
                self.replace_actor(slot)
            blocklist(slot)

        def heartbeats() -> None:
            """Ping every actor; a ping unanswered for heartbeat_s, or one render call running past
            max(stall_s, 4x the longest call seen), means hung. Dead idle actors are replaced here."""
            nonlocal max_call_s
            if sch.heartbeat_s is None:
                return
            now = time.monotonic()
            for slot, actor in enumerate(self.actors):
                if actor is None or any(actor is k for k in killed):  # killed: its death is on its way back
                    continue
                h = heart.get(slot)
                if h is None or h["actor"] is not actor:  # a replacement is not alive until it answers once
                    alive = self.generation[slot] == 0 and slot in self.ready  # answered info(): loaded
                    h = heart[slot] = {"actor": actor, "ref": None, "sent": 0.0, "alive": alive}
                if h["ref"] is None:
                    if now - h["sent"] >= min(1.0, sch.heartbeat_s / 4):
                        h["ref"], h["sent"] = actor.ping.remote(), now
                    continue
                if not ray.wait([h["ref"]], timeout=0)[0]:
                    if h["alive"] and now - h["sent"] > sch.heartbeat_s:
                        hung(slot, f"no heartbeat for {sch.heartbeat_s:g} s")
                    continue
                try:
                    beat = ray.get(h.pop("ref"))
                    h["ref"] = None
                except ray.exceptions.RayError as e:
                    heart.pop(slot, None)
                    if _actor_died(e) and slot not in busy:  # died idle: replace before it is given a shard
                        self.event("actor_died", actor=slot, error=_one_line(e, self.so))
                        self.replace_actor(slot)
                    continue
                h["alive"] = True
                if beat.get("node"):
                    self.actor_nodes[slot] = beat["node"]
                max_call_s = max(max_call_s, beat["max_call_s"])
                limit = max(sch.stall_s, 4 * max_call_s)
                if slot in busy and beat["call_s"] > limit:
                    hung(slot, f"one render call has run {beat['call_s']:.0f} s (limit {limit:.0f} s)")

        def dispatch_prepare(slot: int, run: VideoRun) -> None:
            ctx = VideoContext(
                url=run.input.url,
                frame_count=run.info.frame_count,
                width=run.info.width,
                height=run.info.height,
                fps=float(run.info.fps),
                params={**self.spec.model.params, **run.input.params},  # manifest columns win
                storage_options=self.so,
            )
            ref = self.actors[slot].prepare.options(name=f"{self.spec.job_id}/{run.key}/prepare").remote(ctx)
            run.cond_ref = ref
            in_flight[ref] = ("prepare", (run, slot))
            busy[slot] = ref

        def fill_actors() -> None:
            while True:
                slots = idle_slots()
                if not slots:
                    return
                if self.budget_exhausted():
                    return
                if prep_queue:
                    dispatch_prepare(slots[0], prep_queue.pop(0))
                    continue
                # Ready shards, highest priority first: most frames left in the video (critical path).
                heap = []
                for run in runs:
                    left = run.info.frame_count - sum(run.shards[i].frames for i in run.records)
                    for i in self.ready_shards(run, running_shards):
                        heapq.heappush(heap, (-left, i, next(counter), run))
                live = {k for k, a in enumerate(self.actors) if a is not None}
                while heap:
                    _, i, _, run = heapq.heappop(heap)
                    key = (run.key, i)
                    fresh = [k for k in slots if k not in avoid.get(key, set())]
                    fresh.sort(key=lambda k: hinted.get(k) != key)  # the actor already decoding it first
                    if fresh:
                        dispatch_shard(fresh[0], run, i)
                        break
                    if live <= avoid.get(key, set()):  # every actor failed it once: any may retry
                        dispatch_shard(slots[0], run, i)
                        break
                    # else: leave it for a busy actor that has not failed it yet
                else:
                    if not speculate(slots):
                        return

        def after_shard_done(run: VideoRun, i: int) -> None:
            # Blend every overlap whose two shards are done, then commit once all pieces are in.
            last = run.shards[-1].stage  # only the last pass makes outputs
            for ch, target in run.targets.items():
                for j in (i - 1, i):
                    if j < 0 or j + 1 >= len(run.shards) or (ch, j) in run.blends_sent:
                        continue
                    if not run.shards[j].stage == run.shards[j + 1].stage == last:
                        continue
                    if j in run.records and j + 1 in run.records and run.shards[j].stop > run.shards[j].core_stop:
                        a, b = run.records[j]["channels"][ch], run.records[j + 1]["channels"][ch]
                        ref = blend_task.options(name=f"{self.spec.job_id}/{run.key}/blend-{j}-{ch}").remote(
                            target,
                            f"blend-{run.shards[j].index:04d}",
                            run.shards[j].core_stop,
                            a["tail"],
                            b["head"],
                            self.spec.window.blend,
                        )
                        run.blends_sent.add((ch, j))
                        in_flight[ref] = ("blend", (run, ch))
            maybe_commit(run)

        def maybe_commit(run: VideoRun) -> None:
            if len(run.records) < len(run.shards) or run.status != "running":
                return
            expected = len(output_pieces([s for s in run.shards if s.stage == run.shards[-1].stage]))
            for ch, target in run.targets.items():
                if len(run.pieces[ch]) == expected and ch not in run.outputs and (ch, "commit") not in run.blends_sent:
                    run.blends_sent.add((ch, "commit"))
                    ref = commit_task.options(name=f"{self.spec.job_id}/{run.key}/commit-{ch}").remote(
                        target, run.pieces[ch]
                    )
                    in_flight[ref] = ("commit", (run, ch))

        blend_task = ray.remote(num_cpus=0, max_retries=self.spec.retries)(blend_overlap)
        commit_task = ray.remote(num_cpus=0, max_retries=self.spec.retries)(commit_output)

        for run in runs:  # resumed videos whose shards are all done go straight to blending
            for i in list(run.records):
                after_shard_done(run, i)

        while any(run.status == "running" for run in runs):
            heartbeats()
            fill_actors()
            if not in_flight:
                why = "; ".join(f"actor {k}: {v}" for k, v in sorted(self.retired.items()))
                for run in runs:
                    if run.status == "running":
                        self.fail_video(
                            run,
                            f"{run.input.url}: no healthy actor left to render it ({why})"
                            if all(a is None for a in self.actors)
                            else f"{run.input.url}: stopped, job failure budget max_failed_shards="
                            f"{self.spec.max_failed_shards} exhausted ({self.failed_shards} shards failed)",
                        )
                break
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                kind, payload = in_flight.pop(ref)
                if kind == "loading":
                    if busy.get(payload) == ref:
                        busy.pop(payload)
                    self.actor_loaded(payload, ref)
                    heart.pop(payload, None)  # pinged while loading: start its heartbeat afresh, now alive
                elif kind == "prepare":
                    run, slot = payload
                    busy.pop(slot, None)
                    try:
                        ray.get(ref)
                        run.cond_ready = True
                    except ray.exceptions.RayError as e:
                        if _actor_died(e):
                            self.replace_actor(slot)
                            prep_queue.insert(0, run)
                        else:
                            self.fail_video(run, _one_line(e, self.so))
                elif kind == "abandoned":  # a cancelled copy has stopped: its actor is free again
                    slot, st_ref = payload
                    if busy.get(slot) == ref:
                        busy.pop(slot)
                    _consume(st_ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError as e:
                        if _actor_died(e):  # e.g. killed as hung while stopping: it still needs a successor
                            self.replace_actor(slot)
                elif kind == "shard":
                    run, i, slot, st_ref, _ = payload
                    busy.pop(slot, None)
                    key = (run.key, i)
                    copies[key].remove(ref)
                    others = copies[key]
                    if not others:
                        del copies[key]
                        running_shards.discard(key)
                    try:
                        record = ray.get(ref)
                        _check_plan(run, i, record)
                    except (ray.exceptions.RayError, SinkError) as e:
                        _consume(st_ref)
                        if others:  # the other copy may still finish: only the actor is charged
                            if _actor_died(e):
                                self.replace_actor(slot)
                            else:
                                self.charge_failure(slot)
                                avoid.setdefault(key, set()).add(slot)
                            self.event("shard_failed", video=run.key, shard=i, actor=slot, copy=True,
                                       error=_one_line(e, self.so))
                        else:
                            self.on_shard_error(run, i, slot, e, attempts, avoid, r)
                        blocklist(slot)
                        continue
                    for other in list(others):  # first result wins
                        cancel_copy(other, key)
                    copies.pop(key, None)
                    running_shards.discard(key)
                    if run.status != "running":
                        continue
                    per_frame.append(record["seconds"] / max(run.shards[i].frames, 1))
                    run.records[i] = record
                    s = run.shards[i]
                    if (self.mode == "handoff" or s.stage == 1) and i + 1 < len(run.shards):
                        run.state_refs[i] = st_ref  # the next shard of the chain takes it
                    run.state_refs.pop(i - 1, None)  # consumed: let the object store free it
                    self.ledger.mark_shard_done(run.key, i, {**record, "input": run.fingerprint})
                    for ch in run.targets:
                        if ch in record["channels"]:  # pass 1 of a two-pass model makes no output pieces
                            run.pieces[ch].append(record["channels"][ch]["core"])
                    self.event(
                        "shard_done",
                        video=run.key,
                        shard=i,
                        actor=slot,
                        frames=run.shards[i].stop - run.shards[i].core_start,
                        seconds=record["seconds"],
                    )
                    after_shard_done(run, i)
                elif kind == "blend":
                    run, ch = payload
                    try:
                        run.pieces[ch].append(ray.get(ref))
                    except ray.exceptions.RayError as e:
                        self.fail_video(run, _one_line(e, self.so))
                        continue
                    maybe_commit(run)
                elif kind == "commit":
                    run, ch = payload
                    try:
                        run.outputs[ch] = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        self.fail_video(run, _one_line(e, self.so))
                        continue
                    if len(run.outputs) == len(run.targets) and run.status == "running":
                        run.status, run.seconds = "succeeded", time.time() - run.started
                        self.ledger.write_json(
                            f"videos/{run.key}.json",
                            {"url": run.input.url, "outputs": run.outputs, "input": run.fingerprint},
                        )
                        self.event("video_done", video=run.key, seconds=run.seconds)

    def on_shard_error(self, run: VideoRun, i: int, slot: int, e: Exception, attempts, avoid, retries: int) -> None:
        key = (run.key, i)
        msg = _one_line(e, self.so)
        if _actor_died(e):
            self.replace_actor(slot)
        else:
            self.charge_failure(slot)
            avoid.setdefault(key, set()).add(slot)
        self.event("shard_failed", video=run.key, shard=i, actor=slot, attempt=attempts[key], error=msg)
        if _input_error(e) or attempts[key] > retries:
            self.failed_shards += 1
            self.fail_video(run, msg)

    def budget_exhausted(self) -> bool:
        budget = self.spec.max_failed_shards
        return budget is not None and self.failed_shards > budget

    def manifest(self, t_start: float, input_errors: list[str]) -> dict[str, Any]:
        videos = {}
        for run in self.videos.values():
            videos[run.key] = {
                "url": run.input.url,
                "status": run.status,
                "error": run.error,
                "frames": run.info.frame_count if run.info else None,
                "fps": f"{run.info.fps_num}/{run.info.fps_den}" if run.info else None,
                "shards": len(run.shards),
                "outputs": run.outputs,
                "seconds": round(run.seconds, 3),
            }
        return {
            "job": self.spec.job_id,
            "name": self.spec.name,
            "model": self.spec.model.name,
            "state_mode": self.mode,
            "started": t_start,
            "seconds": round(time.time() - t_start, 3),
            "input_errors": input_errors,
            "videos": videos,
        }


def _check_plan(run: VideoRun, i: int, record: dict[str, Any]) -> None:
    """Every segment holds exactly the frames its plan gives it (av1an#770): else a retried error."""
    s = run.shards[i]
    for ch, entry in record["channels"].items():
        if entry["core"]["frames"] != s.core_stop - s.core_start:
            raise SinkError(
                f"{run.input.url}: shard {i} {ch} segment has {entry['core']['frames']} frames, "
                f"the plan says {s.core_stop - s.core_start}"
            )


def _consume(ref: Any) -> None:
    """Fetch a failed task's other return so Ray does not report it as an unhandled error."""
    try:
        ray.get(ref, timeout=5)
    except Exception:
        pass


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


def _actor_died(e: BaseException) -> bool:
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError)) and not isinstance(
        e, ray.exceptions.RayTaskError
    )


def _input_error(e: BaseException) -> bool:
    from farm.video import VideoError

    return isinstance(_cause(e), (*INPUT_ERRORS, VideoError))


def _one_line(e: BaseException, storage_options: dict[str, Any]) -> str:
    """The root error as one readable line, with credentials removed."""
    cause = _cause(e)
    text = str(cause).strip().splitlines()
    line = text[-1] if isinstance(cause, ray.exceptions.RayError) and text else (text[0] if text else "")
    if not isinstance(cause, (ModelError, JobError)) and not line.startswith(cause.__class__.__name__):
        name = cause.__class__.__name__
        line = f"{name}: {line}" if name not in ("VideoError", "StorageError", "SinkError") else line
    return storage.redact(line, storage_options)


def run_job(
    spec: JobSpec, address: str | None = None, progress: Progress | None = None, force: bool = False
) -> JobResult:
    """Run a job to completion on a local embedded Ray (or the cluster at ``address``)."""
    spec = absolute_local_paths(spec)
    need = math.ceil(spec.resources.actors * spec.resources.cpus_per_actor) + 1
    ensure_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, need))
    from farm.report import write_report

    runner = JobRunner(spec, progress=progress, force=force)
    result = runner.run()
    result.report_url = write_report(runner, result)
    return result
