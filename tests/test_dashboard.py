"""farm in Ray's own observability: the Grafana board's queries against Ray's Prometheus endpoint, and the
Ray dashboard's actors and jobs views in a real browser (headless Chromium).

One farm job runs in a subprocess driver with its own local Ray (dashboard and metrics on 127.0.0.1, token
authentication with a token made here), which stays up while the tests scrape and browse: two videos (one
not a video: a failed video), three overlapping shards of which one fails once and is retried, and every
other shard shifted by 8 levels, so each panel of the board has data, the seams included.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, find_chromium
from test_ops import clean_env, free_port

ROOT = Path(__file__).resolve().parents[1]
BOARD = ROOT / "examples" / "grafana" / "farm.json"
METRIC = re.compile(r"\bray_farm_[a-z0-9_]+")
# Counters exported from their first increment, a node lost or drained: the job here loses none.
ON_NODE_LOSS = {"ray_farm_frames_rerendered_total", "ray_farm_nodes_draining_total"}

SERVE = textwrap.dedent(
    """
    import json, sys
    import ray, yaml
    dash_port, metrics_port, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dash_port, _metrics_export_port=metrics_port, logging_level="WARNING")
    from farm.driver import run_job
    from farm.sample import write_sample
    from farm.spec import parse_spec
    write_sample(d + "/clip.mp4", frames=40, width=64, height=48)
    open(d + "/broken.mp4", "w").write("not a video")
    open(d + "/fail-once", "w").write("")  # the first render call fails; its shard is retried
    params = {"shard_offset": 8, "shard_stride": 12, "fail_once_marker": d + "/fail-once"}
    job = {"name": "board", "inputs": [d + "/clip.mp4", d + "/broken.mp4"],
           "model": {"name": "synthetic", "params": params}, "window": {"frames": 16, "overlap": 4},
           "resources": {"actors": 2}, "output": {"uri": d + "/out/{stem}_{channel}.{ext}", "channels": ["alpha"]}}
    res = run_job(parse_spec(yaml.safe_dump(job), "board.yaml"))
    (key,) = [k for k in res.manifest["videos"] if k.startswith("clip")]
    print("READY " + json.dumps({"job": res.job_id, "ray_job": ray.get_runtime_context().get_job_id(),
                                 "video": key, "shards": res.manifest["videos"][key]["shards"],
                                 "statuses": sorted(v["status"] for v in res.manifest["videos"].values())}),
          flush=True)
    sys.stdin.read()  # up until the tests close stdin
    ray.shutdown()
    """
)


def start_serve(d: Path, env: dict[str, str], dash: int, metrics: int) -> tuple[subprocess.Popen, dict | None]:
    """Run serve.py until it prints READY (returns its doc) or exits (returns None)."""
    proc = subprocess.Popen([sys.executable, "serve.py", str(dash), str(metrics), str(d)], cwd=d, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(d / "serve.err", "w"),
                            text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 300
    while not any(x.startswith("READY ") for x in lines) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    ready = [x for x in lines if x.startswith("READY ")]
    return proc, json.loads(ready[0][len("READY "):]) if ready else None


def stop_serve(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def farm_ray(tmp_path_factory):
    d = tmp_path_factory.mktemp("board")
    (d / "serve.py").write_text(SERVE)
    token = secrets.token_hex(16)
    env = {**clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray port on loopback, as farm's own ensure_ray
           "RAY_metrics_report_interval_ms": "500"}
    for _ in range(2):  # Ray gives a node 30 s to start: on an overloaded machine, once more
        dash, metrics = free_port(), free_port()
        proc, doc = start_serve(d, env, dash, metrics)
        if doc or "timed out during startup" not in (d / "serve.err").read_text():
            break
        stop_serve(proc)
    try:
        if not doc:
            pytest.fail("farm job on a dashboard Ray did not finish:\n" + (d / "serve.err").read_text()[-3000:])
        assert doc["statuses"] == ["failed", "succeeded"], doc  # broken.mp4 fails, clip.mp4 renders
        yield {**doc, "dashboard": f"http://127.0.0.1:{dash}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
               "token": token}
    finally:
        stop_serve(proc)


def board_queries(board: dict) -> dict[str, set[str]]:
    """Panel (or variable) title -> the ray_farm_* series names its queries read."""
    out: dict[str, set[str]] = {}
    for p in board["panels"]:
        out[p["title"]] = {n for t in p["targets"] for n in METRIC.findall(t["expr"])}
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            out[f"variable {v['name']}"] = set(METRIC.findall(v["query"]["query"]))
    return out


def scrape(url: str, job: str) -> dict[str, float]:
    """Series name -> value summed over this job's series, from Ray's Prometheus endpoint."""
    found: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith("ray_farm_") and f'job="{job}"' in line:
            name = line.split("{", 1)[0]
            found[name] = found.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return found


def test_board_imports_like_rays_own_boards():
    board = json.loads(BOARD.read_text())
    assert board["uid"] == "farmDashboard" and board["title"] == "farm"
    ds = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")  # Ray's boards pick the data source so
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        assert p["datasource"] == "${datasource}" and p["targets"], p["title"]
        assert all(t["datasource"] == "${datasource}" and METRIC.search(t["expr"]) for t in p["targets"]), p["title"]
        assert all('exported_job=~"$Job"' in t["expr"] for t in p["targets"]), p["title"]
    wanted = {"ray_farm_frames_rendered_total", "ray_farm_shards_done_total", "ray_farm_shards_failed_total",
              "ray_farm_shards_retried_total", "ray_farm_queue_depth", "ray_farm_active_actors",
              "ray_farm_model_load_seconds", "ray_farm_bytes_written_total", "ray_farm_seam_disagreement"}
    queried = set().union(*board_queries(board).values())
    assert wanted | ON_NODE_LOSS <= queried
    defined = set(re.findall(r'"(farm_[a-z0-9_]+)"', (ROOT / "farm" / "metrics.py").read_text()))
    for series in queried:  # every series the board reads is a metric farm defines (Prometheus adds the suffixes)
        assert re.sub(r"^ray_|_(total|bucket|count|sum)$", "", series) in defined, series


@pytest.mark.slow
def test_every_metric_the_board_queries_is_exported(farm_ray):
    queries = board_queries(json.loads(BOARD.read_text()))
    needed = set().union(*queries.values()) - ON_NODE_LOSS
    found, deadline = {}, time.time() + 90
    while time.time() < deadline:  # the metrics agent exports every RAY_metrics_report_interval_ms
        found = scrape(farm_ray["metrics"], farm_ray["job"])
        if needed <= set(found):
            break
        time.sleep(1)
    missing = {title: sorted(names - set(found) - ON_NODE_LOSS) for title, names in queries.items()
               if names - set(found) - ON_NODE_LOSS}
    assert not missing, f"queried by the board but not exported: {missing}"
    # And the values are this job's: 40 frames in 3 shards, one failed attempt retried, one failed video,
    # every seam 8 levels apart.
    assert found["ray_farm_frames_rendered_total"] == 40 and found["ray_farm_shards_done_total"] == 3
    assert found["ray_farm_shards_failed_total"] == 1 and found["ray_farm_shards_retried_total"] == 1
    assert found["ray_farm_videos_failed_total"] == 1 and found["ray_farm_videos_done_total"] == 1
    assert found["ray_farm_seam_disagreement"] == pytest.approx(8, abs=0.2)
    assert found["ray_farm_seam_disagreement_per_seam_count"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not find_chromium(), reason="no Chromium installed (apt-get install chromium)")
def test_ray_dashboard_shows_farm_actors_and_tasks(farm_ray, tmp_path):
    """The actors view lists <job-id>/actor-<k>; the job's page lists a <job-id>/<video>/shard row per shard
    attempt (one Ray task name per video and kind: the driver keeps bookkeeping per distinct name)."""
    job, base = farm_ray["job"], farm_ray["dashboard"]
    actors = [f"{job}/actor-0", f"{job}/actor-1"]
    shards = [f"{job}/{farm_ray['video']}/shard"]
    shots = Path(os.environ.get("FARM_SCREENSHOTS") or tmp_path)  # FARM_SCREENSHOTS=docs refreshes the README's

    async def browse() -> tuple[str, str, str]:
        async with Browser() as b:
            # What the dashboard's login does with the token: an HttpOnly cookie for the origin.
            await b.set_cookie(base, "ray-authentication-token", farm_ray["token"])
            await b.goto(f"{base}/#/actors")
            actors_text = await b.wait_for(actors)
            await b.screenshot(shots / "dashboard_actors.png")
            await b.goto(f"{base}/#/jobs")
            jobs_text = await b.wait_for([farm_ray["ray_job"], "serve.py"])
            await b.goto(f"{base}/#/jobs/{farm_ray['ray_job']}")
            await b.wait_for(["Task Table"])
            assert await b.click_text("Task Table"), "no Task Table section on the job page"
            await b.wait_for(["Page Size"])
            await b.fill("Page Size", "100")  # every task of the job on one page
            tasks_text = await b.wait_for(shards)
            for section in ("Cluster status and autoscaler", "Ray Core Overview", "Task Timeline (beta)"):
                await b.click_text(section)  # folded, so the screenshot shows the task rows
            await b.screenshot(shots / "dashboard_tasks.png", height=1400)
            return actors_text, jobs_text, tasks_text

    actors_text, jobs_text, tasks_text = asyncio.run(browse())
    assert all(a in actors_text for a in actors), actors_text[-2000:]
    assert farm_ray["ray_job"] in jobs_text and "serve.py" in jobs_text, jobs_text[-2000:]
    assert tasks_text.count(shards[0]) >= farm_ray["shards"], tasks_text[-3000:]
    assert "ModelWorker.render_shard" in tasks_text  # the shards are the actors' render calls
    assert (shots / "dashboard_actors.png").stat().st_size > 10_000
