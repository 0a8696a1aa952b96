"""sha256, written once: of files (segments, weights) and short hex ids of small strings (keys, job ids)."""

from __future__ import annotations

import hashlib
import os

_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def short_sha256(data: str | bytes, n: int) -> str:
    """The first ``n`` hex digits of the sha256 of ``data`` (UTF-8 for text): stable ids, not security."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:n]
