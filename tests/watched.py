"""Run a job in the test's own thread and watch its events as they happen (fault-injection tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
import yaml

from farm.driver import JobResult, JobRunner, absolute_local_paths
from farm.spec import parse_spec


def run_watched(
    job: dict, on_event: Callable[[JobRunner, str, dict], None] | None = None, filename: str = "test.yaml"
) -> tuple[JobResult, JobRunner]:
    """Run ``job``; ``on_event(runner, kind, data)`` sees every event in the driver's thread.

    The driver hands shards to each actor as soon as it has loaded. Tests that put a fault on a given
    actor need that actor to get work, so the first ``actor_ready`` waits until the whole pool has loaded."""
    spec = absolute_local_paths(parse_spec(yaml.safe_dump(job), filename))
    holder: dict[str, Any] = {}

    def progress(kind: str, data: dict) -> None:
        if kind == "actor_ready" and "pool" not in holder:
            holder["pool"] = True
            try:
                ray.get([a.info.remote() for a in holder["runner"].actors if a is not None], timeout=120)
            except ray.exceptions.RayError:
                pass  # an actor that refused to start: the driver reports it
        if on_event:
            on_event(holder["runner"], kind, data)

    runner = JobRunner(spec, progress=progress)
    holder["runner"] = runner
    return runner.run(), runner
