"""Batch inputs from a manifest table, and fingerprints of input files for idempotent re-runs.

A job input ending in ``.csv`` or ``.parquet`` is a table, not a video: one row per video, a ``url``
column, and any other columns (``trimap``, ``mask``, ``prompt``, ...) merged into that video's model
params (they reach ``model.prepare`` through ``VideoContext.params``). Relative URLs in the table are
relative to the table's own folder, so a manifest can travel with its clips. Empty cells are left out.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from typing import Any

from farm import storage
from farm.digest import short_sha256

MANIFEST_EXTS = (".csv", ".parquet")


class ManifestError(ValueError):
    """A manifest that cannot be read; ``str()`` names the file and the reason in one line."""


def is_manifest(url: str) -> bool:
    return url.split("?", 1)[0].lower().endswith(MANIFEST_EXTS)


def _resolve(base_url: str, entry: str) -> str:
    """An entry relative to the manifest's folder becomes a full URL/path; absolute ones stay."""
    if "://" in entry or entry.startswith("/"):
        return entry
    folder = base_url.rsplit("/", 1)[0] if "/" in base_url else "."
    if "://" in folder:
        return storage.join(folder, entry)
    return posixpath.normpath(posixpath.join(folder, entry))


def _clean(value: Any) -> Any:
    """A table cell as a plain JSON value; None for empty cells (NaN, None, blank strings)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return value


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``[(video url, per-video params)]`` in table order; ManifestError on an unreadable table."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(url, storage_options or {})
    except storage.StorageNotFound:
        raise ManifestError(f"{url}: manifest not found") from None
    try:
        if url.split("?", 1)[0].lower().endswith(".csv"):
            # Strings stay strings (a prompt "1" is not a number); numbers in params are parsed as JSON-ish.
            table = pacsv.read_csv(io.BytesIO(data))
        else:
            table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{url}: cannot read manifest ({str(e).splitlines()[0]})") from None
    if "url" not in table.column_names:
        raise ManifestError(f"{url}: manifest has no `url` column (columns: {', '.join(table.column_names)})")
    rows = []
    for n, row in enumerate(table.to_pylist()):
        video = _clean(row.pop("url"))
        if not isinstance(video, str):
            raise ManifestError(f"{url}: row {n + 2}: empty or non-text url")
        params = {k: v for k, v in ((k, _clean(v)) for k, v in row.items()) if v is not None}
        for k, v in params.items():
            if isinstance(v, str) and k not in ("prompt",) and not ("://" in v or v.startswith("/")):
                if v.lower().endswith((".png", ".jpg", ".jpeg", ".npz", ".npy", ".mp4", ".mov", ".exr")):
                    params[k] = _resolve(url, v)  # side files (trimaps, masks) sit next to the manifest
        rows.append((_resolve(url, video), params))
    return rows


def input_fingerprint(
    url: str, storage_options: dict[str, Any] | None = None, params: dict[str, Any] | None = None
) -> str | None:
    """``size:etag`` (object stores) or ``size:mtime`` (files) of an input, plus a hash of its manifest
    params; None when it cannot be read.

    Cheap (one metadata call, no download): a changed file or row re-renders, an unchanged one is skipped.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        info = fs.info(path)
    except Exception:
        return None
    size = info.get("size")
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get(
        "LastModified"
    ) or info.get("updated")
    if hasattr(tag, "isoformat"):
        tag = tag.isoformat()
    fp = f"{size}:{str(tag).strip(chr(34))}"
    if params:
        fp += ":" + short_sha256(json.dumps(params, sort_keys=True, default=str), 10)
    return fp
