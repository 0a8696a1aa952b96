"""Operating the farm against real Ray processes: metrics on the Prometheus endpoint, and remote job
control (submit, status, logs, cancel, resume) through the Ray Jobs API of a separately started head.

Everything that talks to those clusters runs in subprocesses, so the session's own Ray (``ray_session``)
is never disturbed. The head gets its own ``--temp-dir`` (so no other ``ray.init()`` finds it) and its
own ports, and is stopped by signalling its own process group (``ray stop`` would stop every local Ray).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from farm.sample import write_sample

SCRAPE = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    import ray, yaml
    port, d = int(sys.argv[1]), sys.argv[2]
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=port, logging_level="WARNING")
    from farm.driver import run_job
    from farm.spec import parse_spec
    job = {"name": "metrics", "inputs": [d + "/clip.mp4"], "model": {"name": "keyer", "params": {"key": "green"}},
           "window": {"frames": 8, "overlap": 0}, "output": {"uri": d + "/out/{stem}_{channel}.{ext}"}}
    res = run_job(parse_spec(yaml.safe_dump(job), "metrics.yaml"))
    found, deadline = {}, time.time() + 90
    while time.time() < deadline:  # the agent exports every RAY_metrics_report_interval_ms
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith("ray_farm_") and f'job="{res.job_id}"' in line and 'model="keyer"' in line:
                name = line.split("{", 1)[0]
                found[name] = found.get(name, 0) + float(line.rsplit(" ", 1)[1])
        if "ray_farm_frames_rendered_total" in found and "ray_farm_videos_done_total" in found:
            break
        time.sleep(0.5)
    print("METRICS " + json.dumps({"ok": res.ok, "metrics": found}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    return env


def farm_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # Ray 2.60's `ray start` enables token auth; clients send the token (~/.ray/auth_token) in token mode.
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**clean_env(), "RAY_AUTH_MODE": "token"},
    )


@pytest.mark.slow
def test_metrics_reach_prometheus(tmp_path):
    """24 frames in 3 shards: the scraped counters say 24 frames, 3 shards, 1 video, bytes > 0."""
    write_sample(str(tmp_path / "clip.mp4"), frames=24, width=64, height=48)
    (tmp_path / "scrape.py").write_text(SCRAPE)
    env = {**clean_env(), "RAY_metrics_report_interval_ms": "500"}
    r = subprocess.run(
        [sys.executable, "scrape.py", str(free_port()), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("METRICS ")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(line[-1][len("METRICS "):])
    m = doc["metrics"]
    assert doc["ok"]
    assert m["ray_farm_frames_rendered_total"] == 24
    assert m["ray_farm_shards_done_total"] == 3
    assert m["ray_farm_shard_seconds_count"] == 3
    assert m["ray_farm_videos_done_total"] == 1
    assert m["ray_farm_bytes_written_total"] == (tmp_path / "out" / "clip_alpha.mp4").stat().st_size
    assert m["ray_farm_active_actors"] == 0 and m["ray_farm_queue_depth"] == 0  # the job has finished
    assert "ray_farm_model_load_seconds" in m


@pytest.fixture(scope="module")
def head():
    """A Ray head with the Jobs API on 127.0.0.1, in its own temp dir, process group and ports."""
    temp = tempfile.mkdtemp(prefix="farm-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    cmd = ["ray", "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp}"] + [f"{k}={v}" for k, v in ports.items()]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5).read()
            break
        except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("Ray head did not start:\n" + (Path(temp) / "head.log").read_text()[-3000:])
            time.sleep(1)
    try:
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: the head stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of this head still in its group
        except ProcessLookupError:
            pass
        log.close()


def write_job(d: Path, name: str, model: dict, window: dict, frames: int) -> Path:
    write_sample(str(d / f"{name}.mp4"), frames=frames, width=64, height=48)
    job = {
        "name": name,
        "inputs": [f"{name}.mp4"],
        "model": model,
        "window": window,
        "output": {"uri": "out/{job}/{stem}_{channel}.{ext}", "channels": ["alpha"]},
        "resources": {"actors": 1},
    }
    (d / f"{name}.yaml").write_text(yaml.safe_dump(job))
    return d / f"{name}.yaml"


def poll_status(target: str, cwd: Path, address: str | None, until, timeout: float = 240) -> dict:
    args = ["status", "--json", target] + (["--address", address] if address else [])
    deadline = time.time() + timeout
    while True:
        r = farm_cli(*args, cwd=cwd)
        doc = json.loads(r.stdout) if r.stdout.strip() else {}
        if until(doc) or time.time() > deadline:
            return doc
        time.sleep(1)


@pytest.mark.slow
def test_remote_submit_status_logs(head, tmp_path):
    job = write_job(tmp_path, "remote", {"name": "keyer", "params": {"key": "green"}}, {"frames": 8, "overlap": 0}, 24)
    r = farm_cli("submit", "--address", head, "--json", job.name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = json.loads(r.stdout)["id"]
    doc = poll_status(job_id, tmp_path, head, lambda d: d.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"))
    assert doc["status"] == "SUCCEEDED", farm_cli("logs", job_id, "--address", head, cwd=tmp_path).stdout
    (video,) = doc["ledger"]["videos"].values()  # per-video progress from the ledger, via the job's metadata
    assert (video["status"], video["shards_done"], video["shards"], video["frames_done"]) == ("succeeded", 3, 3, 24)
    assert (tmp_path / "out" / "remote" / "remote_alpha.mp4").exists()

    logs = farm_cli("logs", job_id, "--address", head, cwd=tmp_path)
    assert logs.returncode == 0 and "1 succeeded, 0 skipped, 0 failed of 1 videos" in logs.stdout
    follow = farm_cli("logs", job_id, "--address", head, "--follow", cwd=tmp_path, timeout=60)
    assert "1 succeeded" in follow.stdout  # a finished job's log streams to its end and returns
    local = farm_cli("status", job.name, cwd=tmp_path)  # the same from storage alone, no cluster
    assert local.returncode == 0 and "shards 3/3, frames 24/24, failures 0" in local.stdout

    # For cron: --wait streams the log and exits with the run's code; the re-run skips the finished video.
    again = farm_cli("submit", "--address", head, "--wait", job.name, cwd=tmp_path)
    assert again.returncode == 0 and "0 succeeded, 1 skipped, 0 failed of 1 videos" in again.stderr, again.stderr


@pytest.mark.slow
def test_cancel_keeps_finished_shards_and_resume_continues(head, tmp_path):
    slow = {"name": "synthetic", "params": {"sleep_per_frame": 0.25}}
    job = write_job(tmp_path, "slow", slow, {"frames": 8}, 64)  # 8 shards of 2 s on one actor
    r = farm_cli("submit", "--address", head, job.name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0]
    poll_status(job.name, tmp_path, None, lambda d: any(v["shards_done"] for v in d.get("videos", {}).values()))
    c = farm_cli("cancel", "--json", job_id, "--address", head, cwd=tmp_path)
    assert c.returncode == 0 and json.loads(c.stdout)["status"] == "STOPPED", c.stdout + c.stderr
    (v,) = json.loads(farm_cli("status", "--json", job.name, cwd=tmp_path).stdout)["videos"].values()
    assert 1 <= v["shards_done"] < 8 and v["status"] == "running"  # the ledger keeps what was finished
    assert not (tmp_path / "out" / "slow" / "slow_alpha.mp4").exists()
    stopped = farm_cli("status", job_id, "--address", head, cwd=tmp_path)
    assert stopped.returncode == 1 and "STOPPED" in stopped.stdout

    resumed = farm_cli("resume", "--address", head, "--json", job.name, cwd=tmp_path)
    rid = json.loads(resumed.stdout)["id"]
    doc = poll_status(rid, tmp_path, head, lambda d: d.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"))
    assert doc["status"] == "SUCCEEDED"
    import pyarrow.parquet as pq

    (row,) = pq.read_table(doc["ledger"]["report"]).to_pylist()
    assert row["status"] == "succeeded" and row["shards_dispatched"] == 8 - v["shards_done"]  # only what was left
