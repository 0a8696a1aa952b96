"""What every benchmark shares: the machine record, result files, cached clips, RSS readings, job specs.

Benchmarks are not tests: they assert nothing about time. Each measures farm and its baseline side by
side in one run and writes ``bench/results/<name>.json`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("FARM_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "farm-bench")))
SHARED_VIDEOS = Path(os.environ.get("FARM_SHARED", "/work/shared")) / "videos"
RVM_WEIGHTS = Path(os.environ.get("FARM_SHARED", "/work/shared")) / "reference" / "rvm" / "rvm_mobilenetv3_random.pth"


def default_preset() -> str:
    """farm's ``output.preset`` when a job leaves it out (what the benchmarks' own encoders match)."""
    from farm.spec import OutputSpec

    return OutputSpec.model_fields["preset"].default


def parse_args(doc: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not for the README)")
    return p.parse_args()


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict[str, Any]:
    """Where the figures were measured: they mean nothing without it."""
    import av
    import numpy
    import ray

    try:
        import torch

        torch_version, torch_threads = torch.__version__, torch.get_num_threads()
    except ImportError:  # pragma: no cover
        torch_version, torch_threads = None, None
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "ram_gb": round(_mem_total_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_threads_default": torch_threads,
        "ray": ray.__version__,
        "av": av.__version__,
        "numpy": numpy.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
        "code": _code_version(),
    }


def _code_version() -> str:
    """The farm code measured: its commit, "+dirty" when farm/ or actors/ had uncommitted changes.

    A snapshot made with ``git archive`` (no .git) names its commit in a ``.bench_code`` file."""
    import subprocess

    import farm

    root = Path(farm.__file__).resolve().parents[1]
    if (root / ".bench_code").exists():
        return (root / ".bench_code").read_text().strip() + f" (snapshot at {root})"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "farm", "actors"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu'] or m['platform']}, {m['cpu_count']} cores, {m['ram_gb']} GB RAM, Python {m['python']}, "
        f"torch {m['torch']}, Ray {m['ray']}, PyAV {m['av']}, {m['date'][:10]}"
    )


def write_result(name: str, data: dict[str, Any], quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "quick": quick, **data}
    data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path


# ---- several nodes on this machine ------------------------------------------------------------------

AGENT_PORTS = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port", "runtime_env_agent_port")


def local_node_args(**kw: Any) -> dict[str, Any]:
    """``ray.cluster_utils.Cluster.add_node`` (or ``head_node_args``) keyword arguments for one more node on
    this machine: on 127.0.0.1, its agents on ports chosen here. A raylet given its agents' ports does not
    wait for them to write port files, which it gives up on after 15 s (ray#65983): a busy machine starts
    agents slower than that."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return {"node_ip_address": "127.0.0.1", **{p: free_port() for p in AGENT_PORTS}, **kw}


def local_cluster(head: dict[str, Any], workers: list[dict[str, Any]], attempts: int = 3) -> Any:
    """A ``ray.cluster_utils.Cluster`` of a head and ``workers`` on this machine (``local_node_args`` each).
    Ray waits a fixed 30 s for a new node to register; on a busy machine a node can miss that, so each node
    start is tried ``attempts`` times."""
    from ray.cluster_utils import Cluster

    def retried(start: Any) -> Any:
        for attempt in range(attempts):
            try:
                return start()
            except Exception:  # "The current node timed out during startup"
                if attempt == attempts - 1:
                    raise
        return None

    cluster = retried(lambda: Cluster(initialize_head=True, head_node_args=local_node_args(**head)))
    try:
        for w in workers:
            retried(lambda w=w: cluster.add_node(**local_node_args(**w)))
        cluster.wait_for_nodes()
    except Exception:
        cluster.shutdown()
        raise
    return cluster


# ---- clips ------------------------------------------------------------------------------------------


def sample_clip(frames: int, width: int = 64, height: int = 48) -> str:
    """A cached synthetic clip (farm.sample, no audio): tiny frames make decode/encode negligible."""
    from farm.sample import write_sample

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"sample_{width}x{height}_{frames}.mp4"
    if not path.exists():
        tmp = path.with_suffix(".tmp.mp4")
        write_sample(str(tmp), frames=frames, width=width, height=height, audio=False)
        os.replace(tmp, path)
        alpha = Path(os.path.splitext(tmp)[0] + ".alpha.npz")  # write_sample's ground truth: not needed
        if alpha.exists():
            alpha.unlink()
    return str(path)


def trimmed_clip(src: str, frames: int, width: int | None = None, height: int | None = None) -> str:
    """The first ``frames`` frames of ``src`` (optionally resized), re-encoded once with SegmentWriter."""
    from farm.encode import SegmentWriter
    from farm.video import probe, read_frames

    info = probe(src)
    w, h = width or info.width, height or info.height
    frames = min(frames, info.frame_count)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{Path(src).stem}_{w}x{h}_{frames}.mp4"
    if path.exists():
        return str(path)
    import av

    tmp = str(path.with_suffix(".tmp.mp4"))
    with SegmentWriter(tmp, info.fps, w, h, quality=16) as out:
        for rgb in read_frames(src, 0, frames):
            if (w, h) != (info.width, info.height):
                vf = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width=w, height=h, format="rgb24")
                rgb = vf.to_ndarray()
            out.write(rgb)
    os.replace(tmp, path)
    return str(path)


def scratch(name: str) -> Path:
    """A fresh scratch folder for one benchmark's outputs (removed with ``shutil.rmtree`` by the caller)."""
    d = CACHE / "runs" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


# ---- jobs -------------------------------------------------------------------------------------------


def shard_stages(out: Path) -> dict[str, float]:
    """Where the shards' time went, summed over the ledger's shard records under ``out`` (``stages``: the
    model loop's wall and CPU seconds, its wait behind another shard, the decoder's and writers' CPU)."""
    stages: dict[str, float] = {}
    for path in out.rglob("shards/*/*.json"):
        for k, v in (json.loads(path.read_text()).get("stages") or {}).items():
            stages[k] = round(stages.get(k, 0.0) + (v or 0.0), 2)
    return stages


def job_spec(
    name: str,
    inputs: list[str],
    out_dir: Path,
    model: dict[str, Any],
    actors: int,
    cpus_per_actor: float = 1.0,
    window: dict[str, Any] | None = None,
    channels: tuple[str, ...] = ("alpha",),
    format: str = "mp4",
    preset: str | None = None,
    scheduler: dict[str, Any] | None = None,
) -> Any:
    """A JobSpec built the way a user writes one (YAML through parse_spec)."""
    from farm.spec import parse_spec

    job = {
        "name": name,
        "inputs": inputs,
        "model": model,
        "output": {"uri": str(out_dir / "{job}/{stem}_{channel}.{ext}"), "channels": list(channels), "format": format},
        "resources": {"actors": actors, "cpus_per_actor": cpus_per_actor},
    }
    if window:
        job["window"] = window
    if preset:
        job["output"]["preset"] = preset
    if scheduler:
        job["scheduler"] = scheduler
    return parse_spec(yaml.safe_dump(job), f"bench/{name}.yaml")


class EventLog:
    """The driver's progress events, with the pids of the actors as they become ready."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.stamps: list[float] = []  # time.time() when each event reached the callback
        self.pids: list[int] = []
        self.on_ready: list[Any] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))
        self.stamps.append(time.time())
        if kind == "actor_ready":
            self.pids.append(int(data["pid"]))
            for fn in self.on_ready:
                fn(data)

    def received(self, kind: str) -> list[float]:
        """When the callback received each event of ``kind`` (the driver calls it synchronously)."""
        return [t for (k, _), t in zip(self.events, self.stamps, strict=True) if k == kind]


# ---- memory -----------------------------------------------------------------------------------------


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``/proc/<pid>/status`` field in kB (VmRSS: resident now, VmHWM: peak resident), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_env(pid: int, key: str) -> str | None:
    """One variable of a running process's environment (e.g. OMP_NUM_THREADS of an actor)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                k, _, v = item.partition(b"=")
                if k.decode(errors="replace") == key:
                    return v.decode(errors="replace")
    except OSError:
        return None
    return None


class PeakSampler:
    """Polls the peak RSS (VmHWM) of a growing set of pids from a thread; keeps the last value seen
    per pid, so a process that exits (actors are killed at the end of a job) keeps its peak."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.pids: set[int] = set()
        self.peak_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, pid: int) -> None:
        self.pids.add(pid)
        self._poll()

    def _poll(self) -> None:
        for pid in list(self.pids):
            hwm = proc_status_kb(pid, "VmHWM")
            if hwm is not None:
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
