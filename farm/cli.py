"""``farm``: a thin command line over the library (``run_job(spec)`` does the work).

Exit codes: 0 every video succeeded, 1 some failed (or the job could not run), 2 a bad job file.
Errors are one line on stderr; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from farm.spec import SpecError, absolute_local_paths, load_spec

EXIT_OK, EXIT_FAILED, EXIT_SPEC = 0, 1, 2


def _fail(message: str, code: int) -> None:
    click.echo(f"farm: {message}", err=True)
    sys.exit(code)


def _load(job: str):
    """The job file's spec, local paths made absolute: every command shows the job id submit uses."""
    try:
        return absolute_local_paths(load_spec(job))
    except SpecError as e:
        _fail(str(e), EXIT_SPEC)


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Render long videos through video AI models on a Ray cluster."""
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the validated spec as JSON.")
def validate(job: str, as_json: bool) -> None:
    """Check a job file without running it."""
    spec = _load(job)
    if as_json:
        click.echo(json.dumps(spec.public_dict(), indent=2))
    else:
        click.echo(f"{job}: ok (job id {spec.job_id}, model {spec.model.name}, {len(spec.inputs)} input pattern(s))")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def plan(job: str, as_json: bool) -> None:
    """Dry run: probe the inputs and print the work graph of every video (the units a run runs)."""

    from actors import load_model_class
    from farm.graph import build_graph, check_limits, video_shards
    from farm.inputs import expand_inputs
    from farm.plan import PlanError, resolve_window
    from farm.video import VideoError, probe

    spec = _load(job)
    model_cls = load_model_class(spec.model.name)
    mode, frames, overlap, preroll = resolve_window(spec.window, model_cls.window)
    channels = list(spec.output.channels)
    videos, errors = expand_inputs(spec.inputs, spec.storage_options)
    doc: dict[str, Any] = {"job": spec.job_id, "mode": mode, "passes": model_cls.passes, "videos": {},
                           "errors": list(errors)}
    for v in videos:  # the graph run_job runs: the same shards, refine units, blends, commits and limits
        try:
            info = probe(v.url, spec.storage_options)
            refused = check_limits(v.url, info.frame_count, info.width, info.height, spec.limits.max_frames,
                                   spec.limits.max_pixels)
            if refused:
                doc["errors"].append(refused)
                continue
            shards = video_shards(v.key, info.frame_count, frames, overlap, preroll, model_cls.passes)
            units = build_graph(v.key, shards, mode, model_cls.passes, channels)
            doc["videos"][v.url] = {
                "frames": info.frame_count,
                "fps": str(info.fps),
                "size": [info.width, info.height],
                "shards": [s.to_dict() for s in shards],
                "units": [u.to_dict() for u in units],
            }
        except (VideoError, PlanError) as e:
            doc["errors"].append(f"{v.url}: {e}")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_plan(doc, spec, frames, overlap, preroll)
    for line in doc["errors"]:
        click.echo(f"farm: {line}", err=True)
    if doc["errors"]:
        sys.exit(EXIT_FAILED)


def _print_plan(doc: dict[str, Any], spec: Any, frames: int, overlap: int, preroll: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lim = spec.limits
    limits = ", ".join(f"{k} {v}" for k, v in (("max_frames", lim.max_frames), ("max_pixels", lim.max_pixels)) if v)
    console.print(
        f"job {spec.job_id}: model {spec.model.name}, state {doc['mode']}, window {frames} "
        f"frames, overlap {overlap}" + (f", preroll {preroll}" if preroll else "")
        + (f", {doc['passes']} passes" if doc["passes"] > 1 else "") + (f", limits {limits}" if limits else "")
    )
    for url, v in doc["videos"].items():
        table = Table(title=f"{url} ({v['frames']} frames, {v['fps']} fps, {v['size'][0]}x{v['size'][1]})")
        for col in ("unit", "frames", "core", "preroll", "needs"):
            table.add_column(col)
        shards = {s["index"] + (len(v["shards"]) // doc["passes"] if s["stage"] else 0): s for s in v["shards"]}
        for u in v["units"]:
            s = shards.get(u["shard"]) if u["kind"] in ("render", "refine") else None
            span = f"[{u['frames'][0]}, {u['frames'][1]})" if u["frames"] else ""
            core = f"[{s['core_start']}, {s['core_stop']})" if s else ""
            needs = ", ".join(u["needs"]) if len(u["needs"]) <= 4 else f"{len(u['needs'])} units"
            table.add_row(u["id"], span, core, str(s["preroll"]) if s else "", needs)
        console.print(table)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option(
    "--address",
    default=None,
    help="http://HEAD:8265 submits through the Ray Jobs API and prints the job id; a Ray address "
    "(HOST:6379, auto) runs the driver here against that cluster; default: an embedded local Ray.",
)
@click.option("--force", is_flag=True, help="Render again what the ledger says is done.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (or the submitted job id) as JSON.")
@click.option("--wait", is_flag=True, help="With an http:// address: stream the job's log, exit with its exit code.")
@click.pass_context
def submit(
    ctx: click.Context, job: str, address: str | None, force: bool, quiet: bool, as_json: bool, wait: bool
) -> None:
    """Render every input video of JOB and commit the outputs."""
    if address and address.startswith(("http://", "https://")):
        _submit_remote(ctx, job, address, force, as_json, wait)
        return
    from farm.driver import JobError, run_job
    from farm.progress import ProgressBar
    from farm.report import summary_line

    spec = _load(job)
    stdout = sys.stdout
    # Ray prints worker and raylet lines to stdout: they go to stderr, stdout keeps farm's results alone
    sys.stdout = sys.stderr
    try:
        with ProgressBar(enabled=not quiet and not as_json) as bar:
            result = run_job(spec, address=address, progress=bar.update, force=force)
    except JobError as e:
        _fail(str(e), EXIT_FAILED)
    except Exception as e:  # one line, never a traceback, unless --debug
        if ctx.obj["debug"]:
            raise
        from farm.errors import one_line

        _fail(one_line(e, spec.storage_options), EXIT_FAILED)
    m = result.manifest
    if as_json:
        doc = {**m, "manifest_url": result.manifest_url, "report_url": result.report_url}
        click.echo(json.dumps(doc, indent=2), file=stdout)
    else:
        for v in m["videos"].values():
            outs = ", ".join(o["url"] for o in v["outputs"].values()) if v["outputs"] else ""
            line = (
                f"{v['status']:9s} {v['url']}"
                + (f" -> {outs}" if outs else "")
                + (f": {v['error']}" if v["error"] else "")
            )
            click.echo(line, file=sys.stderr if v["status"] == "failed" else stdout)
        summary = f"job {m['job']}: {summary_line(m)}; manifest {result.manifest_url}; report {result.report_url}"
        click.echo(summary, file=stdout)
    for line in m["input_errors"]:
        click.echo(f"farm: {line}", err=True)
    sys.exit(EXIT_OK if result.ok and not m["input_errors"] else EXIT_FAILED)


def _submit_remote(ctx: click.Context, job: str, address: str, force: bool, as_json: bool, wait: bool) -> None:
    from farm import remote

    _load(job)  # a bad job file is exit 2 here, before anything reaches the cluster
    try:
        job_id = remote.submit(job, address, force=force)
    except remote.RemoteError as e:
        _fail(str(e), EXIT_FAILED)
    if as_json:
        click.echo(json.dumps({"id": job_id, "address": address}))
    else:
        click.echo(job_id)
        if not wait:
            click.echo(f"follow it: farm status {job_id} --address {address}; farm logs {job_id} --follow", err=True)
    if wait:  # for cron: the cluster's exit code (0 all done, 1 some failed, 2 bad spec) becomes ours
        try:
            remote.logs(job_id, address, follow=True, echo=lambda s: click.echo(s, nl=False, err=True))
            remote.wait(job_id, address, timeout=float("inf"))
            doc = remote.status(job_id, address)
        except remote.RemoteError as e:
            _fail(str(e), EXIT_FAILED)
        code = doc.get("driver_exit_code")
        if doc["status"] == "SUCCEEDED":
            sys.exit(EXIT_OK)
        sys.exit(code if code in (EXIT_FAILED, EXIT_SPEC) else EXIT_FAILED)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="As for submit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def resume(ctx: click.Context, job: str, address: str | None, quiet: bool, as_json: bool) -> None:
    """Run JOB again: finished videos and shards in its ledger are skipped (same as submit)."""
    ctx.invoke(submit, job=job, address=address, force=False, quiet=quiet, as_json=as_json)


@main.command()
@click.argument("target")
@click.option("--address", default=None, help="Ray dashboard http://HEAD:8265 (or RAY_ADDRESS) for a job ID.")
@click.option("--json", "as_json", is_flag=True)
def status(target: str, address: str | None, as_json: bool) -> None:
    """Progress of a job: TARGET is a job file (read from its ledger in storage) or a submitted job ID.

    Exit code 0 when the job succeeded (or is still running), 1 when it failed or was stopped."""
    from farm import remote
    from farm.report import ledger_status

    if remote.looks_like_job_file(target):
        doc = ledger_status(_load(target))
        ray_state = None
    else:
        try:
            doc = remote.status(target, address)
        except remote.RemoteError as e:
            _fail(str(e), EXIT_FAILED)
        ray_state = doc["status"]
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        if ray_state:
            click.echo(f"job {doc['id']}: {ray_state}" + (f" ({doc['message']})" if doc.get("message") else ""))
        ledger = doc if ray_state is None else doc.get("ledger")
        if ledger:
            click.echo(f"job {ledger['job']}: {ledger['state']} (ledger {ledger['ledger']})")
            for v in ledger["videos"].values():
                click.echo(
                    f"  {v['status']:9s} {v['url']}: shards {v['shards_done']}/{v['shards']}, frames "
                    f"{v['frames_done']}/{v['frames']}, failures {v['failures']}"
                    + _seam_text(v.get("worst_seam"), v.get("seam_disagreement_max"))
                    + (f": {v['error']}" if v.get("error") else "")
                )
    videos = (doc if ray_state is None else doc.get("ledger") or {}).get("videos", {})
    bad = ray_state in ("FAILED", "STOPPED") or any(v["status"] == "failed" for v in videos.values())
    sys.exit(EXIT_FAILED if bad else EXIT_OK)


def _seam_text(seam: dict | None, worst: float | None) -> str:
    """``, worst seam 0.40/255 (alpha, frame 28)``: where two shards' renders disagreed most before blending."""
    if not seam:
        return ", worst seam 0/255 (no frame rendered twice)" if worst == 0 else ""
    return f", worst seam {seam['worst']:.2f}/255 ({seam['output']}, frame {seam['worst_frame']})"


@main.command()
@click.argument("job_id")
@click.option("--address", default=None, help="Ray dashboard http://HEAD:8265 (or RAY_ADDRESS).")
@click.option("--follow", "-f", is_flag=True, help="Stream the log until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="Print {id, logs} as JSON (not with --follow).")
def logs(job_id: str, address: str | None, follow: bool, as_json: bool) -> None:
    """The driver log of a submitted job."""
    from farm import remote

    try:
        text = remote.logs(job_id, address, follow=follow and not as_json, echo=lambda s: click.echo(s, nl=False))
    except remote.RemoteError as e:
        _fail(str(e), EXIT_FAILED)
    if text is not None:
        click.echo(json.dumps({"id": job_id, "logs": text}) if as_json else text, nl=as_json)


@main.command()
@click.argument("job_id")
@click.option("--address", default=None, help="Ray dashboard http://HEAD:8265 (or RAY_ADDRESS).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the job has stopped.")
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, address: str | None, wait: bool, as_json: bool) -> None:
    """Stop a submitted job; its finished shards stay in the ledger, so `farm resume` continues it."""
    from farm import remote

    try:
        stopped = remote.cancel(job_id, address)
        state = remote.wait(job_id, address, timeout=120) if wait else None
    except remote.RemoteError as e:
        _fail(str(e), EXIT_FAILED)
    if as_json:
        click.echo(json.dumps({"id": job_id, "stop_requested": stopped, "status": state}))
    else:
        click.echo(f"job {job_id}: " + (state or ("stop requested" if stopped else "was not running")))


@main.command()
def models() -> None:
    """List the model plugins."""
    from actors import load_model_class, model_names

    for name in model_names():
        try:
            cls = load_model_class(name)
            w = cls.window
            click.echo(
                f"{name:10s} outputs={','.join(cls.outputs)} window={w.frames} overlap={w.overlap} "
                f"state={w.state} weights={'yes' if cls.needs_weights else 'no'}"
            )
        except Exception as e:  # a broken third-party plugin must not hide the others
            click.echo(f"{name:10s} (cannot load: {e.__class__.__name__}: {e})")


@main.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--frames", default=96, show_default=True)
@click.option("--size", default="320x240", show_default=True, help="WIDTHxHEIGHT")
@click.option("--fps", default="24", show_default=True, help="Frame rate, e.g. 24 or 30000/1001")
@click.option("--key", type=click.Choice(["green", "blue"]), default="green", show_default=True)
@click.option("--seed", default=0, show_default=True)
def sample(out: str, frames: int, size: str, fps: str, key: str, seed: int) -> None:
    """Write a synthetic green-screen clip and its ground-truth alpha (OUT and OUT's .alpha.npz)."""
    from fractions import Fraction

    from farm.sample import write_sample

    try:
        width, height = (int(x) for x in size.lower().split("x"))
        rate = Fraction(fps)
    except ValueError:
        _fail(f"--size {size} / --fps {fps}: expected WIDTHxHEIGHT and a number or fraction", EXIT_SPEC)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    video, alpha = write_sample(out, frames=frames, width=width, height=height, fps=rate, key=key, seed=seed)
    click.echo(f"wrote {video} and {alpha}")


@main.command()
@click.argument("output")
@click.option("-o", "--out", default=None, help="A .png for a one-video job, else a folder (default: .).")
@click.option("--frames", default=4, show_default=True, help="Rows: frames spread over the video.")
@click.option("--width", default=240, show_default=True, help="Thumbnail width in pixels.")
@click.option("--background", default=None, help="Composite over R,G,B in [0,1] (default: a checkerboard).")
def preview(output: str, out: str | None, frames: int, width: int, background: str | None) -> None:
    """Contact sheet per video of a render (input | alpha | composite); OUTPUT: job YAML or manifest.json."""
    from farm.preview import PreviewError, preview_job

    bg = None
    if background:
        try:
            bg = tuple(float(x) for x in background.split(","))
            assert len(bg) == 3 and all(0 <= x <= 1 for x in bg)
        except (ValueError, AssertionError):
            _fail(f"--background {background}: expected R,G,B with each in [0, 1]", EXIT_SPEC)
    try:
        sheets, left_out = preview_job(output, out, frames=frames, width=width, background=bg)
    except SpecError as e:
        _fail(str(e), EXIT_SPEC)
    except PreviewError as e:
        _fail(str(e), EXIT_FAILED)
    for s in sheets:
        click.echo(f"wrote {s.path} ({s.size[0]}x{s.size[1]}, frames {', '.join(map(str, s.frames))})")
    for line in left_out:
        click.echo(f"farm: {line}", err=True)
    sys.exit(EXIT_OK if sheets and not left_out else EXIT_FAILED)


if __name__ == "__main__":
    main()
