"""Autoscaling from zero with Ray's fake multinode provider: a job whose actors need a custom resource
that only worker nodes have makes the autoscaler add nodes, finishes there, and the nodes go away after
the idle timeout.

The cluster is a ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` with provider type
``fake_multinode`` (what ``ray.cluster_utils.AutoscalingCluster`` does, but in its own temp dir, ports and
process group: that helper runs ``ray stop --force``, which would stop every Ray on the machine, and its
``example.yaml`` is not in the wheel). The farm job runs in a subprocess connected with
``run_job(address=...)``, so the session's own Ray is untouched. farm asks for nothing with
``request_resources``: the pending actors' resource demands are what the autoscaler sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from farm.driver import run_job
from farm.sample import write_sample
from farm.spec import parse_spec

FRAMES, ACTORS, RESOURCE = 48, 2, "farm_node"

# The worker node type carries RESOURCE; the head has no CPU and none of it, so every actor needs a new node.
CONFIG = {
    "cluster_name": "farm-fake",
    "max_workers": 3,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "farm_worker": {
            "resources": {"CPU": 1, RESOURCE: 1, "object_store_memory": 100 * 2**20},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 3,
        },
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,  # 6 s: minutes are a float, as in Ray's own fake-cluster example
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}

JOB = textwrap.dedent(
    """
    import json, sys, time
    import ray, yaml
    from farm.driver import JobRunner, absolute_local_paths, ensure_ray
    from farm.spec import parse_spec

    address, job = sys.argv[1], json.loads(sys.argv[2])
    ensure_ray(address)

    def workers():
        return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("RESOURCE"))

    before, actor_nodes, peak, holder = workers(), [], 0, {}

    def progress(kind, data):
        global peak
        if kind == "actor_ready":
            actor_nodes.append(data["node"])
            if "pool" not in holder:  # the driver starts on the first node up; let the whole pool be placed
                holder["pool"] = True
                ray.get([a.info.remote() for a in holder["runner"].actors if a is not None], timeout=300)
        if kind == "shard_done":
            peak = max(peak, len(workers()))

    runner = JobRunner(absolute_local_paths(parse_spec(yaml.safe_dump(job), "autoscale.yaml")), progress=progress)
    holder["runner"] = runner
    result = runner.run()
    seen = {n["NodeID"]: n["Resources"].get("RESOURCE", 0) for n in ray.nodes()}  # dead nodes stay listed
    deadline = time.time() + 180  # a generous bound: the check is on the state reached, not on how soon
    while workers() and time.time() < deadline:
        time.sleep(1)
    print("RESULT " + json.dumps({"ok": result.ok, "manifest": result.manifest, "before": before, "peak": peak,
                                  "actor_nodes": actor_nodes, "seen": seen, "after": workers()}), flush=True)
    """
).replace("RESOURCE", RESOURCE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Ray 2.60's `ray start` turns token auth on; a client in token mode reads the token it wrote.
    return {**env, "RAY_AUTH_MODE": "token", **extra}


@pytest.fixture
def fake_cluster():
    """A fake-multinode autoscaling head; yields its GCS address. Stopped through its own process group."""
    temp = Path(tempfile.mkdtemp(prefix="farm-as-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs = free_port()
    config = json.loads(json.dumps(CONFIG))
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"  # worker nodes join this head, not one on 6379
    (temp / "autoscaler.json").write_text(json.dumps(config))
    ports = [
        "--port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ]
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        "--num-cpus=0",
        "--node-ip-address=127.0.0.1",
        "--object-store-memory=200000000",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp / 'ray'}",
        f"--autoscaling-config={temp / 'autoscaler.json'}",
    ]
    cmd += [f"{p}={gcs if p == '--port' else free_port()}" for p in ports]
    log = open(temp / "head.log", "w")
    # Every node on 127.0.0.1: the head by --node-ip-address, the fake worker nodes the autoscaler starts by
    # Ray's single-machine mode (they take the loopback address; the driver connects with ensure_ray).
    env = ray_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + 120
    while "Ray runtime started" not in (temp / "head.log").read_text():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("fake autoscaling head did not start:\n" + (temp / "head.log").read_text()[-3000:])
        time.sleep(0.5)
    try:
        yield f"127.0.0.1:{gcs}", temp
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: the head stops what it started, the fake worker nodes too
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def job(d: Path, out: Path, custom: dict | None) -> dict:
    return {
        "name": "autoscale",
        "inputs": [str(d / "clip.mp4")],
        "model": {"name": "synthetic", "params": {"sleep_per_frame": 0.02}},
        "window": {"frames": 8},
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["alpha"]},
        "resources": {"actors": ACTORS, "custom": custom or {}},
    }


def frames_of(manifest: dict) -> list[bytes]:
    (video,) = manifest["videos"].values()
    folder = Path(video["outputs"]["alpha"]["url"])
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))]


@pytest.mark.slow
def test_job_scales_the_cluster_up_and_idle_nodes_go_away(ray_session, fake_cluster, tmp_path):
    address, temp = fake_cluster
    write_sample(str(tmp_path / "clip.mp4"), frames=FRAMES, width=64, height=48, seed=3)
    reference = run_job(parse_spec(yaml.safe_dump(job(tmp_path, tmp_path / "ref", None)), "ref.yaml"))
    assert reference.ok and len(frames_of(reference.manifest)) == FRAMES

    spec = job(tmp_path, tmp_path / "out", {RESOURCE: 1})
    r = subprocess.run(
        [sys.executable, "-c", JOB, address, json.dumps(spec)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env=ray_env(),
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    monitor = "\n".join(p.read_text()[-2000:] for p in temp.glob("ray/session_latest/logs/monitor.log"))
    assert line, r.stdout[-2000:] + r.stderr[-3000:] + monitor
    doc = json.loads(line[-1][len("RESULT ") :])

    assert doc["before"] == []  # no worker node before the job asked for one
    assert doc["ok"], doc["manifest"]
    assert frames_of(doc["manifest"]) == frames_of(reference.manifest)  # complete, and the same frames
    workers = {node for node, amount in doc["seen"].items() if amount > 0}
    assert len(set(doc["actor_nodes"])) == ACTORS and set(doc["actor_nodes"]) <= workers  # added for the job
    assert doc["peak"] >= 1
    assert doc["after"] == [], monitor  # scaled back down once idle
