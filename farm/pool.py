"""The driver's Ray code: the model actors (start, replace, ping, submit, abort, kill) and small tasks.

Mechanics only, as Ray Data's actor pool: it tracks actors and calls, and turns what comes back into
typed completions (``Loaded``, ``Beat``, ``Done``, ``Failed``, ...) with Ray's exceptions made a
``policy.Failure``. What to run where is the scheduler's business (``farm.schedule``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from actors.base import ModelError
from farm.assemble import Assembler
from farm.channels import BackgroundError
from farm.errors import cause, one_line, redact
from farm.plan import PlanError
from farm.policy import Failure
from farm.worker import ModelConfig, ModelWorker

log = logging.getLogger("farm")
WorkerActor = ray.remote(ModelWorker)
AssemblerActor = ray.remote(Assembler)
ASSEMBLER_THREADS = 8  # blends and commits of several videos at once
INPUT_ERRORS = (ModelError, PlanError, BackgroundError)  # about the input: no other actor can do better


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
    from ray._private import ray_constants

    if address:
        was = ray_constants.ENABLE_RAY_CLUSTER
        if address.split(":")[0] in ("127.0.0.1", "localhost"):
            # Ray rewrites a loopback address into the machine's network address before it connects, where a
            # cluster bound to 127.0.0.1 (every node started with node_ip_address=127.0.0.1) does not listen.
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = was
        return
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


def failure(e: BaseException, storage_options: dict[str, Any] | None = None) -> Failure:
    """A Ray (or driver-side) exception in the scheduler's terms."""
    from farm.video import VideoError

    died = isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError)) and not isinstance(
        e, ray.exceptions.RayTaskError
    )
    return Failure(one_line(e, storage_options), actor_died=died,
                   input_error=isinstance(cause(e), (*INPUT_ERRORS, VideoError)))


def run_tasks(fn: Callable[..., Any], calls: list[tuple[str, tuple]], storage_options: dict[str, Any]) -> list[Any]:
    """Run ``fn(*args)`` as a task per ``(name, args)``, all at once; each result, or the ``Failure`` it raised."""
    task = ray.remote(num_cpus=0)(fn)
    refs = [task.options(name=name).remote(*args) for name, args in calls]
    out: list[Any] = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            out.append(failure(e, storage_options))
    return out


# ---- completions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    slot: int
    generation: int
    info: dict[str, Any]


@dataclass(frozen=True)
class LoadFailed:
    slot: int
    generation: int
    failure: Failure


@dataclass(frozen=True)
class Beat:
    slot: int
    generation: int
    beat: dict[str, Any]


@dataclass(frozen=True)
class PingFailed:
    slot: int
    generation: int
    failure: Failure


@dataclass(frozen=True)
class Done:
    attempt: int
    value: Any
    state: Any = None  # a render's second return (the ObjectRef of its handed-off state)
    ref: Any = None  # the call's own ObjectRef (a prepare's result is passed on by reference)


@dataclass(frozen=True)
class Failed:
    attempt: int
    failure: Failure


Completion = Loaded | LoadFailed | Beat | PingFailed | Done | Failed


class Pool:
    """The job's model actors by slot, and every call in flight (``ref -> what it was``)."""

    def __init__(self, job_id: str, config: ModelConfig, resources: Any, storage_options: dict[str, Any],
                 retries: int, queue: int = 1) -> None:
        self.job_id, self.config, self.resources, self.so = job_id, config, resources, storage_options
        self.queue = queue  # shards an actor holds at once (scheduler.shards_per_actor)
        self.actors: list[Any] = []
        self.generation: list[int] = []
        self.calls: dict[Any, tuple[str, Any]] = {}  # ref -> (kind, payload)
        self.aborts: dict[Any, dict[str, Any]] = {}  # abort-call ref -> the cancelled copy it stops
        self.refs: dict[int, tuple[Any, Any]] = {}  # attempt -> (its ref, its state ref)
        self.assembler: Any = None  # blends and commits (``farm.assemble.Assembler``)
        self.retries = retries

    # ---- actors ------------------------------------------------------------------------------

    def start(self, n: int) -> None:
        """Start ``n`` actors; each reports ``Loaded`` (or ``LoadFailed``) once its model is loaded."""
        self.actors, self.generation = [None] * n, [0] * n
        for slot in range(n):
            self._start(slot, 0)
        self._start_assembler()

    def _start_assembler(self) -> None:
        """On the driver's node when it can (the outputs' uploads start there), restarted by Ray if it dies."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        options: dict[str, Any] = dict(
            num_cpus=0, max_concurrency=ASSEMBLER_THREADS, max_restarts=-1, max_task_retries=self.retries,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        )
        self.assembler = _named(AssemblerActor, f"{self.job_id}/assembler", options)

    def replace(self, slot: int, generation: int, avoid_nodes: frozenset[str] = frozenset()) -> None:
        self._start(slot, generation, avoid_nodes)

    def _start(self, slot: int, generation: int, avoid_nodes: frozenset[str] = frozenset()) -> None:
        r = self.resources
        name = f"{self.job_id}/actor-{slot}" + (f"-r{generation}" if generation else "")
        options: dict[str, Any] = dict(
            num_cpus=r.cpus_per_actor,
            num_gpus=r.gpus_per_actor,
            resources=dict(r.custom) or None,  # custom node resources the autoscaler scales on
            # shards_per_actor render calls (they take turns at the model), plus ping, abort and prefetch beside
            max_concurrency=self.queue + 2,
            max_restarts=0,  # the driver replaces dead actors itself, and knows which shard they held
        )
        if avoid_nodes:  # replacements keep off blocklisted nodes
            options["label_selector"] = {"ray.io/node-id": f"!in({','.join(sorted(avoid_nodes))})"}
        actor = _named(WorkerActor, name, options, self.config, self.so)
        self.actors[slot], self.generation[slot] = actor, generation
        self.calls[actor.info.remote()] = ("info", (slot, generation))

    def ping(self, slot: int, generation: int) -> None:
        if self.actors[slot] is not None and self.generation[slot] == generation:
            self.calls[self.actors[slot].ping.remote()] = ("ping", (slot, generation))

    def prefetch(self, slot: int, url: str, shard: Any, handoff_at: int | None) -> None:
        """A hint, not a call to wait for: the actor starts decoding ``shard`` on its second thread."""
        if self.actors[slot] is not None:
            self.actors[slot].prefetch.remote(url, shard, handoff_at, self.so)

    def kill(self, slot: int) -> None:
        if self.actors[slot] is not None:
            ray.kill(self.actors[slot])

    def forget(self, slot: int) -> None:
        """The slot gets no more work (retired): its handle is dropped (killed at the end if still alive)."""
        self.kill(slot)
        self.actors[slot] = None

    def alive_nodes(self) -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def draining_nodes(self) -> dict[str, float] | None:
        """The nodes Ray is draining (a preemption notice turned into ``DrainNode`` by the autoscaler, or
        ``ray drain-node``), each with the seconds left to its deadline (math.inf: none given); None when
        the GCS did not answer. The GCS client's call that Ray Serve and Ray Data poll."""
        try:
            deadlines = ray._private.worker.global_worker.gcs_client.get_draining_nodes(timeout=5)
        except Exception as e:  # a slow GCS must not stop the job: the next poll asks again
            log.debug("farm: draining nodes not read: %s", e)
            return None
        now_ms = time.time() * 1000
        return {_hex(node): (max(ms - now_ms, 0.0) / 1000 if ms else math.inf) for node, ms in deadlines.items()}

    # ---- calls -------------------------------------------------------------------------------

    def submit(self, attempt: int, slot: int, method: str, *args: Any, name: str, returns: int = 1) -> None:
        """Call ``method`` on the actor in ``slot``; with ``returns=2`` the second return is a render's state."""
        call = getattr(self.actors[slot], method).options(name=task_label(name), num_returns=returns)
        refs = call.remote(*args)
        ref, state = (refs[0], refs[1]) if returns == 2 else (refs, None)
        self.calls[ref] = ("attempt", (attempt, name, slot))
        self.refs[attempt] = (ref, state)

    def run_task(self, attempt: int, fn: Callable[..., Any], *args: Any, name: str) -> None:
        """A small task (blend, commit) on the job's assembler, retried by Ray ``retries`` times if it dies."""
        ref = self.assembler.run.options(name=task_label(name)).remote(fn, *args)
        self.calls[ref] = ("attempt", (attempt, name, None))
        self.refs[attempt] = (ref, None)

    def cancel(self, attempt: int, info: dict[str, Any]) -> None:
        """Stop a losing copy: ``ray.cancel`` drops it if it had not started, ``abort`` stops it between
        chunks. Its call stays in flight until it has stopped (its actor is busy until then)."""
        ref, _ = self.refs[attempt]
        _, (_, name, slot) = self.calls[ref]
        ray.cancel(ref)
        if slot is not None and self.actors[slot] is not None:
            self.aborts[self.actors[slot].abort.remote(name)] = info

    def checkpoint(self, attempt: int) -> None:
        """Ask a shard attempt to stop at its next chunk boundary and save its state (its node is draining);
        its call returns a partial record. An answer not waited for: the attempt's own call says what it did."""
        ref, _ = self.refs.get(attempt, (None, None))
        kind, payload = self.calls.get(ref, (None, None))
        if kind == "attempt":
            _, name, slot = payload
            if slot is not None and self.actors[slot] is not None:
                self.actors[slot].checkpoint.remote(name)

    def wait(self, timeout: float) -> list[Completion]:
        """What finished within ``timeout`` seconds (at least one call, unless none finished)."""
        if not self.calls:
            time.sleep(min(timeout, 0.05))
            return []
        refs = list(self.calls)
        done, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if done and rest:
            done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return [self._completion(ref) for ref in done]

    def _completion(self, ref: Any) -> Completion:
        kind, payload = self.calls.pop(ref)
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as e:
            f = failure(e, self.so)
            if kind == "info":
                return LoadFailed(*payload, f)
            if kind == "ping":
                return PingFailed(*payload, f)
            attempt = payload[0]
            _consume(self.refs.pop(attempt)[1])
            return Failed(attempt, f)
        if kind == "info":
            if value.get("error"):  # alive, but holds no model: it reported why instead of crashing; stop it
                slot, generation = payload
                if self.generation[slot] == generation:
                    self.kill(slot)
                detail = value.get("detail")
                return LoadFailed(*payload, Failure(redact(value["error"], self.so),
                                                    detail=redact(detail, self.so) if detail else None))
            return Loaded(*payload, value)
        if kind == "ping":
            return Beat(*payload, value)
        attempt = payload[0]
        return Done(attempt, value, self.refs.pop(attempt)[1], ref)

    # ---- the end -----------------------------------------------------------------------------

    def wait_for_aborts(self, timeout: float) -> list[dict[str, Any]]:
        """Before the actors are killed: every cancelled copy has acknowledged its abort, so none is
        killed halfway through writing a frame (png frames go straight to their final keys). Returns the
        copies that confirmed; one that does not answer within ``timeout`` is hung and killed with the rest."""
        if not self.aborts:
            return []
        done, _ = ray.wait(list(self.aborts), num_returns=len(self.aborts), timeout=timeout)
        stopped = []
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                continue  # its actor died: nothing of it is writing any more
            stopped.append(self.aborts[ref])
        self.aborts.clear()
        return stopped

    def shutdown(self) -> None:
        for a in [*self.actors, self.assembler]:
            if a is not None:
                ray.kill(a)


def task_label(name: str) -> str:
    """The name the Ray dashboard shows for a call: its video's and kind's, without the shard's index
    (``<job>/<video>/shard``, ``.../blend``; ``.../prepare`` and ``.../commit-<channel>`` as they are).
    Ray's driver keeps bookkeeping per distinct task name for as long as it runs (about 20 KB each, measured
    with ``bench/memory.py``): per-shard names grew the driver with the video's length and a batch's size.
    Shards are told apart by the events, the ledger and their errors, which name them in full."""
    head, _, last = name.rpartition("/")
    return f"{head}/{re.sub(r'-[0-9].*$', '', last)}"


def _named(actor_class: Any, name: str, options: dict[str, Any], *args: Any) -> Any:
    """Start an actor under ``name`` (what the Ray dashboard shows), made unique if an earlier run in this
    Ray session still holds it."""
    try:
        return actor_class.options(name=name, **options).remote(*args)
    except ValueError:
        return actor_class.options(name=f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**6}", **options).remote(*args)


def _hex(node: Any) -> str:
    return node if isinstance(node, str) else node.hex() if hasattr(node, "hex") else str(node)


def _consume(ref: Any) -> None:
    """Fetch a failed call's other return so Ray does not report it as an unhandled error."""
    if ref is None:
        return
    try:
        ray.get(ref, timeout=5)
    except Exception:
        pass
