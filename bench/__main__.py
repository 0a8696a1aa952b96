"""Run every benchmark, each in its own process (its own Ray session): ``python -m bench [--quick]``.

One benchmark alone: ``python -m bench.<name> [--quick]``. Results go to ``bench/results/<name>.json``.
``python -m bench --table`` prints the README's Performance table from those files (runs nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
# seams: RVM handoff vs preroll error; accelerator: the model's busy share, pipelined actor vs serial loop;
# flow: optical flow estimators' error and speed; void: VAE tiling, pass-2 seams; preemption: wasted work
# when a spot node is preempted, drain vs ignore; presets: x264 presets' CPU, size, fidelity against medium
BENCHMARKS = ("orchestration", "end_to_end", "io", "memory", "seams", "accelerator", "presets", "flow", "void",
              "preemption")


def _load(name: str) -> dict[str, Any] | None:
    path = HERE / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _row(what: str, farm: str, base: str, ratio: float, target: str, met: bool) -> str:
    return f"| {what} | {farm} | {base} | {ratio:.2f} | {target} | {'yes' if met else 'no'} |"


def table() -> str:
    """Markdown rows (benchmark, farm, baseline, ratio, target, met?) from bench/results/*.json."""
    rows = ["| benchmark | farm | baseline | ratio | target | met? |", "| --- | --- | --- | --- | --- | --- |"]
    machine_line = None
    o = _load("orchestration")
    if o:
        machine_line = o["machine_line"]
        for label, runs in (("1 node", o["local_node"]), ("4-node Cluster", o["cluster_4_nodes"]["runs"])):
            for r in runs:
                if r["actors"] not in (4, 16):
                    continue
                for key, what in (
                    ("efficiency", "incl. pool start"),
                    ("efficiency_once_ready", "actors once ready"),
                ):
                    rows.append(
                        _row(
                            f"orchestration, {r['actors']} actors, {label}, {what}",
                            f"{round(r['wall_s'], 1)} s wall" if key == "efficiency" else "ready actor-time",
                            f"{r['ideal_s']} s ideal" if key == "efficiency" else "work",
                            r[key],
                            ">= 0.9",
                            r[key] >= 0.9,
                        )
                    )
    e = _load("end_to_end")
    if e:
        machine_line = machine_line or e["machine_line"]
        for c in e["cases"]:
            target = ">= 1.5" if c["case"].startswith("rvm") else "-"
            met = c["ratio"] >= 1.5 if c["case"].startswith("rvm") else True
            rows.append(
                _row(
                    f"end to end, {c['case']}, {c['farm']['frames']} frames 720p, 2 actors",
                    f"{c['farm']['fps']} fps",
                    f"{c['plain']['fps']} fps plain loop",
                    c["ratio"],
                    target,
                    met,
                )
            )
    io = _load("io")
    if io:
        for res, d in io["decode"].items():
            rows.append(
                _row(
                    f"decode {res}",
                    f"{d['farm_fps']} fps",
                    f"{d['bare_pyav_fps']} fps PyAV",
                    d["ratio"],
                    ">= 0.9",
                    d["ratio"] >= 0.9,
                )
            )
        d = io["encode"]
        rows.append(
            _row(
                f"encode {d['resolution']}",
                f"{d['farm_fps']} fps",
                f"{d['bare_pyav_fps']} fps PyAV",
                d["ratio"],
                ">= 0.9",
                d["ratio"] >= 0.9,
            )
        )
        a = io["segment_parallel_assembly_1080p"]
        rows.append(
            _row(
                f"assembly 1080p, {a['segments']} segments in 2 processes + concat",
                f"{a['parallel_fps']} fps",
                f"{a['serial_fps']} fps one encoder",
                a["speedup"],
                "-",
                True,
            )
        )
    m = _load("memory")
    if m:
        small, big = m["runs"]
        rows.append(
            _row(
                f"driver peak RSS, {big['frames']} vs {small['frames']} frames",
                f"{big['driver_peak_mib']} MiB",
                f"{small['driver_peak_mib']} MiB",
                m["ratio_driver_peak"],
                "<= 1.1",
                m["ratio_driver_peak"] <= 1.1,
            )
        )
        rows.append(
            _row(
                f"actor peak RSS, {big['frames']} vs {small['frames']} frames",
                f"{max(big['actor_peak_mib'])} MiB",
                f"{max(small['actor_peak_mib'])} MiB",
                m["ratio_actor_peak"],
                "<= 1.1",
                m["ratio_actor_peak"] <= 1.1,
            )
        )
    acc = _load("accelerator")
    if acc:
        for c in acc["cases"]:
            p, sr = c["pipeline"], c["serial"]
            target = acc["target"]
            is_target = (c["sleep_per_frame"], c["format"], c.get("preset")) == (
                target["sleep_per_frame"], target["format"], target.get("preset", c.get("preset")))
            preset = f" {c['preset']}" if c.get("preset") else ""
            rows.append(
                _row(
                    f"accelerator busy share, {c['format']}{preset} alpha+fgr, {c['sleep_per_frame']} s/frame, 1 actor "
                    f"(load {p['loadavg_1m_before']:.0f} / {sr['loadavg_1m_before']:.0f})",
                    f"{p['busy_share']} busy",
                    f"{sr['busy_share']} serial loop",
                    c["ratio"],
                    ">= 0.9 busy" if is_target else "-",
                    p["busy_share"] >= 0.9 if is_target else True,
                )
            )
    pr = _load("presets")
    if pr:
        for kind, rows_ in pr["results"].items():
            v, med = rows_["veryfast"], rows_["medium"]
            rows.append(_row(f"x264 veryfast vs medium, {kind}, CRF 16: CPU-s per frame (size {v['size_vs_medium']}x, "
                             f"PSNR {v['psnr_db']} vs {med['psnr_db']} dB)", f"{v['cpu_s_per_frame']}",
                             f"{med['cpu_s_per_frame']}", v["cpu_vs_medium"], "-", True))
    p = _load("preemption")
    if p:
        drain, ignore = p["summary"]["wasted_drain"], p["summary"]["wasted_ignore"]
        ratio = drain / ignore if ignore else float(drain > 0)
        rows.append(_row("preemption, 1 of 3 nodes at 50% of a job: frames rendered twice / frames",
                         f"{drain:.1%} (drain)", f"{ignore:.1%} (ignore)", ratio, "< 1", drain < ignore))
    out = "\n".join(rows)
    if machine_line:
        out += f"\n\nMachine: {machine_line}"
    return out


def main() -> int:
    args = sys.argv[1:]
    if args == ["--table"]:
        print(table())
        return 0
    unknown = [a for a in args if a != "--quick"]
    if unknown:
        print(f"usage: python -m bench [--quick | --table] (unknown: {' '.join(unknown)})", file=sys.stderr)
        return 2
    failed = []
    for name in BENCHMARKS:
        if not (HERE / f"{name}.py").exists():
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}", *args]).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
