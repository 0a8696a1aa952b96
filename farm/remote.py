"""Submit jobs to a running Ray cluster through the Ray Jobs API, and control them (status, logs, cancel).

The job file travels in the submission's ``runtime_env`` (a working dir holding only ``job.yaml``), and
the cluster runs ``farm submit --quiet --address auto job.yaml``: the same code path as a local run, so
the ledger, resume and the report behave the same. Local paths in the job are made absolute before
upload (they name the submitting machine's files, which a single-machine or shared-filesystem cluster
can read; use object-store URLs on a real cluster).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class RemoteError(RuntimeError):
    """The cluster or a job on it cannot be reached; ``str()`` is one line."""


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RemoteError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        hint = ""
        if "Authentication" in e.__class__.__name__:  # Ray >= 2.52 `ray start` turns token auth on
            hint = " (set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
        raise RemoteError(f"cannot reach the Ray Jobs API at {address}: {str(e).splitlines()[0]}{hint}") from None


def portable_job_text(job_path: str) -> str:
    """The job file with local input/output paths made absolute (the job id stays what a local run uses)."""
    data = yaml.safe_load(Path(job_path).read_text())

    def fix(url: str) -> str:
        return url if "://" in url else os.path.abspath(url)

    data["inputs"] = [fix(u) for u in data.get("inputs", [])]
    output = data.setdefault("output", {})
    if "uri" in output:
        output["uri"] = fix(output["uri"])
    else:
        from farm.spec import OutputSpec

        output["uri"] = fix(OutputSpec().uri)
    return yaml.safe_dump(data, sort_keys=False)


def submit(job_path: str, address: str | None, force: bool = False, extra_pip: list[str] | None = None) -> str:
    """Submit ``job_path`` to the cluster; returns the Ray submission id (``<job id>-<time>``)."""
    from farm.spec import load_spec

    spec = load_spec(job_path)  # refuse a bad file here, not on the cluster (SpecError -> exit 2)
    c = client(address)
    workdir = tempfile.mkdtemp(prefix="farm-submit-")
    try:
        Path(workdir, "job.yaml").write_text(portable_job_text(job_path))
        submission_id = f"{spec.job_id}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 1000:03d}"
        entrypoint = "farm submit --quiet --address auto" + (" --force" if force else "") + " job.yaml"
        runtime_env: dict[str, Any] = {"working_dir": workdir}
        if extra_pip:
            runtime_env["pip"] = list(extra_pip)
        try:
            return c.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env,
                metadata={"farm_job": spec.job_id, "farm_job_file": os.path.abspath(job_path)},
            )
        except Exception as e:
            raise RemoteError(f"submit to {c.get_address()} failed: {str(e).splitlines()[0]}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def status(submission_id: str, address: str | None) -> dict[str, Any]:
    """The Ray job's state, plus per-video progress from the ledger when the job file is readable here."""
    c = client(address)
    try:
        info = c.get_job_info(submission_id)
    except Exception as e:
        raise RemoteError(f"job {submission_id}: {str(e).splitlines()[0]}") from None
    doc: dict[str, Any] = {
        "id": submission_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "farm_job": (info.metadata or {}).get("farm_job"),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }
    job_file = (info.metadata or {}).get("farm_job_file")
    if job_file and os.path.exists(job_file):
        from farm.report import ledger_status
        from farm.spec import SpecError, load_spec

        try:
            doc["ledger"] = ledger_status(load_spec(job_file))
        except (SpecError, OSError) as e:
            doc["ledger_error"] = str(e).splitlines()[0]
    return doc


def logs(submission_id: str, address: str | None, follow: bool = False, echo: Any = None) -> str | None:
    """The job's driver log; with ``follow``, stream its chunks to ``echo(text)`` until the job ends."""
    c = client(address)
    if not follow:
        try:
            return c.get_job_logs(submission_id)
        except Exception as e:
            raise RemoteError(f"job {submission_id}: {str(e).splitlines()[0]}") from None

    async def tail() -> None:
        async for chunk in c.tail_job_logs(submission_id):
            (echo or print)(chunk)

    asyncio.run(tail())
    return None


def cancel(submission_id: str, address: str | None) -> bool:
    """Stop the job (its driver gets SIGTERM, its actors die); finished shards stay in the ledger."""
    c = client(address)
    try:
        return bool(c.stop_job(submission_id))
    except Exception as e:
        raise RemoteError(f"job {submission_id}: {str(e).splitlines()[0]}") from None


def wait(submission_id: str, address: str | None, timeout: float = 600.0, poll: float = 1.0) -> str:
    """Block until the job reaches a terminal state; returns it (SUCCEEDED, FAILED or STOPPED)."""
    c = client(address)
    deadline = time.monotonic() + timeout
    while True:
        state = str(c.get_job_status(submission_id).value)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll)


def looks_like_job_file(arg: str) -> bool:
    return bool(re.search(r"\.ya?ml$", arg)) or os.path.isfile(arg)
