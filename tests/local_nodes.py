"""Node arguments for a several-node ``ray.cluster_utils.Cluster`` in tests: every node on 127.0.0.1, its
agents on ports chosen beforehand (``bench.common.local_node_args``, shared with the benchmarks)."""

from bench.common import local_node_args as node_args

__all__ = ["node_args"]
