"""Expand a job's inputs (paths, URLs, globs) into videos with stable, collision-free keys."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from farm.digest import short_sha256

GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class VideoInput:
    url: str
    stem: str  # file name without extension, used in output templates
    key: str  # stem + short hash of the URL: unique within the job, safe as a path segment
    params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # from a manifest row


def video_key(url: str, stem: str) -> str:
    return f"{_safe(stem)}-{short_sha256(url, 8)}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "video"


def stem_of(url: str) -> str:
    base = posixpath.basename(url.rstrip("/").split("?", 1)[0])
    return _safe(base.rsplit(".", 1)[0] if "." in base else base)


def expand_inputs(
    patterns: list[str], storage_options: dict[str, Any] | None = None
) -> tuple[list[VideoInput], list[str]]:
    """Returns the videos and, separately, one error line per pattern that matched nothing.

    A pattern ending in .csv/.parquet is a manifest table (``farm.manifest_inputs``): its rows are
    the videos, and its other columns become per-video model params."""
    import fsspec

    from farm.manifest_inputs import ManifestError, is_manifest, read_manifest

    videos: list[VideoInput] = []
    errors: list[str] = []
    seen: set[str] = set()
    for i, pattern in enumerate(patterns):
        urls = [pattern]
        row_params: dict[str, dict[str, Any]] = {}
        if is_manifest(pattern):
            try:
                rows = read_manifest(pattern, storage_options)
            except ManifestError as e:
                errors.append(f"inputs[{i}] {e}")
                continue
            urls = [u for u, _ in rows]
            row_params = {u: p for u, p in reversed(rows)}  # the first row of a repeated url wins
            if not urls:
                errors.append(f"inputs[{i}] {pattern}: manifest has no rows")
                continue
        elif GLOB_CHARS.search(pattern):
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
            videos.append(VideoInput(url=url, stem=stem, key=video_key(url, stem), params=row_params.get(url, {})))
    return videos, errors
