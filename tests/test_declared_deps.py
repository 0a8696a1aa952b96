"""The RVM ONNX path (what `jobs/rvm.yaml` uses without GitHub) imports only what `pip install -e .` installs.

A new user installs farm without extras, then runs the README's RVM job: every package the ONNX-to-torch
conversion imports must be among farm's declared dependencies (or what they depend on), never a test extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT.parent / "shared" / "weights" / "rvm_mobilenetv3_fp32.onnx"

_LOAD = """
import json, sys
from farm.weights import load_state_dict
state = load_state_dict(sys.argv[1])
assert len(state) > 300, len(state)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(dist: str, with_extras: frozenset[str] = frozenset()) -> set[str]:
    """``dist`` and everything it needs when installed with ``with_extras`` (markers evaluated here)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(dist, with_extras)]
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            env_ok = any(req.marker is None or req.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if env_ok:
                todo.append((_name(line), frozenset(req.extras)))
    return seen


def test_onnx_is_a_declared_dependency_not_a_test_extra() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "onnx" in {_name(r) for r in project["dependencies"]}
    assert "onnx" not in {_name(r) for r in project["optional-dependencies"].get("test", [])}


@pytest.mark.skipif(not ONNX.exists(), reason="../shared/weights/rvm_mobilenetv3_fp32.onnx is not here")
def test_rvm_onnx_path_imports_only_declared_dependencies() -> None:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(ONNX)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    declared = _closure("farm")
    owners = metadata.packages_distributions()
    imported = {_name(d) for m in modules for d in owners.get(m, [])}
    assert "onnx" in imported, "the ONNX path did not go through onnx"
    undeclared = sorted(imported - declared - {"farm"})
    assert not undeclared, f"the RVM ONNX path imports packages farm does not declare: {undeclared}"
