"""Model plugins. Built-ins are listed here; third parties register under the ``farm.models`` entry point."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN = {
    "keyer": "actors.keyer:ChromaKeyer",
    "rvm": "actors.rvm:RVM",
    "ftpvm": "actors.ftpvm:FTPVM",
    "synthetic": "actors.synthetic:SyntheticModel",
    "synthetic-2pass": "actors.synthetic:SyntheticTwoPass",
    "gvm": "actors.gvm:GVM",
    "void": "actors.void:VOID",
    "videograin": "actors.videograin:VideoGrain",
}


def model_names() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group="farm.models"))
    return sorted(names)


def model_target(name: str) -> str:
    """``module:Class`` for a model name, without importing it (so ``farm validate`` stays light)."""
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group="farm.models"):
        if ep.name == name:
            return ep.value
    raise KeyError(f"unknown model {name!r} (known: {', '.join(model_names())})")


def load_model_class(name: str):
    module, _, attr = model_target(name).partition(":")
    return getattr(importlib.import_module(module), attr)
