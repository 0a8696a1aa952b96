"""Tensors from a weights file (safetensors, torch zip/legacy, ONNX through a converter), never running code
stored in it: torch files load with ``weights_only=True``; a pickle beyond tensors is refused."""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import WeightsError, one_line

if TYPE_CHECKING:
    import torch

# ONNX files that a converter turns into a state dict, by file-name pattern: "module:function" (imported
# only when used, so farm itself never imports torch or onnx) or a callable.
ONNX_CONVERTERS: dict[str, str | Callable[[Path], dict[str, Any]]] = {
    "rvm_mobilenetv3*.onnx": "actors.rvm_onnx:onnx_to_rvm_state_dict",
}


def register_onnx_converter(pattern: str, converter: str | Callable[[Path], dict[str, Any]]) -> None:
    """Let ``load_state_dict`` read ONNX files named like ``pattern`` (fnmatch) through ``converter``."""
    ONNX_CONVERTERS[pattern] = converter


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors from a weights file, without ever running code stored in it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # a corrupt header raises safetensors' own errors
            raise WeightsError(f"cannot read {path}: {one_line(e)}") from e
    if suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return _load_torch(path)
    if suffix == ".onnx":
        return _load_onnx(path)
    raise WeightsError(f"{path}: unknown weights format {suffix or '(no suffix)'!r} "
                       "(expected .safetensors, .pth, .pt, .ckpt, .bin or .onnx)")


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    import pickle

    import torch

    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
        raise WeightsError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        if not found:
            why = re.search(r"WeightsUnpickler error: *\n*([^\n]+)", str(e))
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint "
                               f"({why.group(1).strip() if why else one_line(e)[:200]})") from None
        raise WeightsError(f"refusing to load {path}: it pickles objects beyond tensors, which could run "
                           f"code ({found.group(0)})") from None
    except Exception as e:  # truncated zip, wrong magic number...
        raise WeightsError(f"cannot read {path}: {one_line(e)}") from e
    # Training checkpoints wrap the weights: {"state_dict": {...}} (Lightning) or {"model": {...}}.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def _load_onnx(path: Path) -> dict[str, torch.Tensor]:
    for pattern, converter in ONNX_CONVERTERS.items():
        if fnmatch.fnmatch(path.name, pattern):
            if isinstance(converter, str):
                module, _, attr = converter.partition(":")
                converter = getattr(importlib.import_module(module), attr)
            try:
                return converter(path)
            except WeightsError:
                raise
            except Exception as e:  # a converter's mismatch errors become one line
                raise WeightsError(f"cannot convert {path}: {one_line(e)}") from e
    raise WeightsError(f"{path}: no ONNX converter for this file name "
                       f"(registered: {', '.join(ONNX_CONVERTERS) or 'none'}; see register_onnx_converter)")
