"""Several-node ``ray.cluster_utils.Cluster`` helpers for tests, shared with the benchmarks: every node on
127.0.0.1, its agents on ports chosen beforehand, each node start retried (``bench.common``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from bench.common import local_cluster
from bench.common import local_node_args as node_args
from farm.pool import ensure_ray

# A killed node is declared dead in about a second.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200, "health_check_failure_threshold": 5}


@contextmanager
def connected_cluster(workers: list[dict[str, Any]]) -> Iterator[Any]:
    """A head with no CPU (no actor lands there) and ``workers``, fast health checks, this process
    connected to it; shut down afterwards."""
    c = local_cluster({"num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH}, workers)
    try:
        ensure_ray(c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


__all__ = ["FAST_HEALTH", "connected_cluster", "local_cluster", "node_args"]
