"""Several-node ``ray.cluster_utils.Cluster`` helpers for tests, shared with the benchmarks: every node on
127.0.0.1, its agents on ports chosen beforehand, each node start retried (``bench.common``)."""

from bench.common import local_cluster
from bench.common import local_node_args as node_args

__all__ = ["local_cluster", "node_args"]
