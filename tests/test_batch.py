"""Nightly batches: a CSV manifest of 20 clips (2 broken), exit codes for cron, the Parquet report, and
idempotent re-runs (nothing is dispatched again; a changed input is rendered again)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farm.inputs import expand_inputs
from farm.manifest_inputs import input_fingerprint
from farm.report import read_report
from farm.sample import write_sample


def farm_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    """20 tiny clips listed in clips/manifest.csv with a per-video `prompt` column; 2 are not videos."""
    d = tmp_path_factory.mktemp("batch")
    clips = d / "clips"
    clips.mkdir()
    rows = ["url,prompt"]
    for i in range(18):
        write_sample(str(clips / f"c{i:02d}.mp4"), frames=8, width=64, height=48, seed=i)
        rows.append(f"c{i:02d}.mp4,take {i}")
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "notes.mp4").write_text("this is a text file, not a video\n")
    rows += ["empty.mp4,", "notes.mp4,"]
    (clips / "manifest.csv").write_text("\n".join(rows) + "\n")
    job = {
        "name": "nightly",
        "inputs": ["clips/manifest.csv"],
        "model": {"name": "keyer", "params": {"key": "green"}},
        "output": {"uri": "renders/{job}/{stem}_{channel}.{ext}", "channels": ["alpha"]},
        "resources": {"actors": 2},
        "retries": 0,
    }
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    return d


def test_manifest_rows_become_videos_with_params(batch):
    videos, errors = expand_inputs([str(batch / "clips" / "manifest.csv")])
    assert errors == []
    assert len(videos) == 20
    assert videos[0].url == str(batch / "clips" / "c00.mp4")  # relative to the manifest's folder
    assert videos[3].params == {"prompt": "take 3"}
    assert videos[-1].params == {}  # an empty cell adds no param


def test_bad_manifest_is_one_clear_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,prompt\na.mp4,x\n")
    videos, errors = expand_inputs([str(tmp_path / "m.csv"), str(tmp_path / "none.parquet")])
    assert videos == []
    assert errors[0] == f"inputs[0] {tmp_path}/m.csv: manifest has no `url` column (columns: path, prompt)"
    assert errors[1] == f"inputs[1] {tmp_path}/none.parquet: manifest not found"


@pytest.mark.slow
def test_nightly_batch_report_exit_codes_and_idempotent_rerun(batch, ray_session):
    first = farm_cli("submit", "--quiet", "job.yaml", cwd=batch)
    assert first.returncode == 1, first.stderr  # some videos failed
    assert "18 succeeded, 0 skipped, 2 failed of 20 videos" in first.stdout
    outputs = sorted((batch / "renders").rglob("*_alpha.mp4"))
    assert len(outputs) == 18

    report_url = first.stdout.rsplit("report ", 1)[1].strip()
    rows = {Path(r["url"]).name: r for r in read_report(report_url)}
    failed = {k: r for k, r in rows.items() if r["status"] == "failed"}
    assert set(failed) == {"empty.mp4", "notes.mp4"}
    for name, r in failed.items():
        assert r["error"] and "\n" not in r["error"] and name in r["error"], r["error"]
        assert r["outputs"] == [] and r["shards_dispatched"] == 0
    ok = [r for r in rows.values() if r["status"] == "succeeded"]
    assert len(ok) == 18 and all(r["frames"] == 8 and r["fps"] > 0 and len(r["outputs"]) == 1 for r in ok)
    assert all(r["shards_dispatched"] == 1 for r in ok)

    # The re-run: nothing new is rendered (no shard dispatched), the broken clips still fail (exit 1).
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    again = farm_cli("submit", "--quiet", "--json", "job.yaml", cwd=batch)
    assert again.returncode == 1, again.stderr
    doc = json.loads(again.stdout)
    # validate and plan name the job id submit used (its ledger), although the job's paths are relative
    assert f"(job id {doc['job']}," in farm_cli("validate", "job.yaml", cwd=batch).stdout
    assert json.loads(farm_cli("plan", "--json", "job.yaml", cwd=batch).stdout)["job"] == doc["job"]
    rows2 = read_report(doc["report_url"])
    assert sorted(r["status"] for r in rows2).count("skipped") == 18
    assert sum(r["shards_dispatched"] for r in rows2) == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes

    # A changed input (new bytes, same name) is rendered again; the others stay skipped.
    changed = batch / "clips" / "c05.mp4"
    before = input_fingerprint(str(changed))
    write_sample(str(changed), frames=8, width=64, height=48, seed=99)
    assert input_fingerprint(str(changed)) != before
    import os

    from farm.driver import run_job
    from farm.spec import load_spec

    cwd = os.getcwd()
    os.chdir(batch)  # the job's paths are relative to where it is submitted from
    try:
        result = run_job(load_spec("job.yaml"))
    finally:
        os.chdir(cwd)
    statuses = {Path(v["url"]).name: v["status"] for v in result.manifest["videos"].values()}
    assert statuses["c05.mp4"] == "succeeded"
    why = {Path(v["url"]).name: (v["status"], v.get("error")) for v in result.manifest["videos"].values()}
    assert sum(s == "skipped" for s in statuses.values()) == 17, why
    assert [Path(r["url"]).name for r in read_report(result.report_url) if r["shards_dispatched"]] == ["c05.mp4"]


def test_bad_job_file_exits_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\ninputs: []\n")
    r = farm_cli("submit", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "bad.yaml" in r.stderr and "inputs" in r.stderr
