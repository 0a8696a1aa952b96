"""Expand a job's inputs (paths, URLs, globs) into videos with stable, collision-free keys."""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from typing import Any

GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class VideoInput:
    url: str
    stem: str  # file name without extension, used in output templates
    key: str  # stem + short hash of the URL: unique within the job, safe as a path segment


def video_key(url: str, stem: str) -> str:
    return f"{_safe(stem)}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "video"


def stem_of(url: str) -> str:
    base = posixpath.basename(url.rstrip("/").split("?", 1)[0])
    return _safe(base.rsplit(".", 1)[0] if "." in base else base)


def expand_inputs(
    patterns: list[str], storage_options: dict[str, Any] | None = None
) -> tuple[list[VideoInput], list[str]]:
    """Returns the videos and, separately, one error line per pattern that matched nothing."""
    import fsspec

    videos: list[VideoInput] = []
    errors: list[str] = []
    seen: set[str] = set()
    for i, pattern in enumerate(patterns):
        urls = [pattern]
        if GLOB_CHARS.search(pattern):
            fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=storage_options or {})
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            urls = sorted(p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths)
            if not urls:
                errors.append(f"inputs[{i}] {pattern}: no file matches")
                continue
        for url in urls:
            if url in seen:
                continue
            seen.add(url)
            stem = stem_of(url)
            videos.append(VideoInput(url=url, stem=stem, key=video_key(url, stem)))
    return videos, errors
