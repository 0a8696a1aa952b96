"""A job's plan and progress, kept next to its output as small atomically written files (the av1an way).

Layout under ``<static output prefix>/.farm/<job-id>/``::

    spec.json, plan.json             what was asked and how it was split
    shards/<video>/shard-0003.json   one done-marker per finished shard (segment URLs, checksums, state URL)
    state/<video>/shard-0003.npz     recurrent state handed to the next shard, so a resumed chain continues
    parts/<video>/<name>             segments and overlap pieces before assembly
    events/<time>-<pid>-<rand>.json  one small record per event (never appended in place: object stores
                                     cannot append, and concurrent writers must not overwrite each other)
    manifest.json                    written last: its presence means the job finished

Resume reads the shard markers in one listing and skips what is done.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from typing import Any

import numpy as np

from farm import storage

LEDGER_DIR = ".farm"
_SHARD_FILE = re.compile(r"^shard-(\d+)\.json$")


class Ledger:
    """Read and write one job's ledger at ``root_url`` (the ``.../.farm/<job-id>`` folder)."""

    def __init__(self, root_url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root_url.rstrip("/") or root_url
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"Ledger({self.root!r})"

    @classmethod
    def for_job(cls, prefix_url: str, job_id: str, storage_options: dict[str, Any] | None = None) -> Ledger:
        """The ledger of ``job_id`` under an output prefix (``storage.static_prefix`` of the template)."""
        return cls(storage.safe_join(storage.join(prefix_url, LEDGER_DIR), job_id), storage_options)

    @classmethod
    def find(
        cls, prefix_url: str, job_id: str, storage_options: dict[str, Any] | None = None
    ) -> Ledger | None:
        """The existing ledger of ``job_id`` under ``prefix_url``, or None if that job never started there."""
        ledger = cls.for_job(prefix_url, job_id, storage_options)
        return ledger if storage.exists(ledger.root, ledger.storage_options) else None

    # ---- generic ---------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        """URL of ``name`` inside the ledger (escapes refused)."""
        return storage.safe_join(self.root, name)

    def write_json(self, name: str, obj: Any) -> str:
        data = json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()
        return storage.write_bytes_atomic(self.url(name), data, self.storage_options)

    def read_json(self, name: str, default: Any = None) -> Any:
        """The JSON document ``name``, or ``default`` when it does not exist."""
        try:
            return json.loads(storage.read_bytes(self.url(name), self.storage_options))
        except storage.StorageNotFound:
            return default

    # ---- job documents ---------------------------------------------------------------------------

    def write_spec(self, spec: dict[str, Any]) -> str:
        return self.write_json("spec.json", spec)

    def read_spec(self) -> dict[str, Any] | None:
        return self.read_json("spec.json")

    def write_plan(self, plan: dict[str, Any]) -> str:
        return self.write_json("plan.json", plan)

    def read_plan(self) -> dict[str, Any] | None:
        return self.read_json("plan.json")

    def write_manifest(self, manifest: dict[str, Any]) -> str:
        """Write last: a manifest means every output of the job is committed."""
        return self.write_json("manifest.json", manifest)

    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json("manifest.json")

    # ---- shards ----------------------------------------------------------------------------------

    @staticmethod
    def _shard_name(index: int) -> str:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"shard index must be a non-negative int, got {index!r}")
        return f"shard-{index:04d}"

    def _video_dir(self, kind: str, video_key: str) -> str:
        return storage.safe_join(storage.join(self.root, kind), video_key)

    def mark_shard_done(self, video_key: str, index: int, record: dict[str, Any]) -> str:
        """Atomically record shard ``index`` of ``video_key`` as finished; ``record`` is stored as given."""
        url = storage.join(self._video_dir("shards", video_key), f"{self._shard_name(index)}.json")
        data = json.dumps(record, indent=1, sort_keys=True, allow_nan=False).encode()
        return storage.write_bytes_atomic(url, data, self.storage_options)

    def done_shards(self, video_key: str) -> dict[int, dict[str, Any]]:
        """``{index: record}`` of the finished shards of ``video_key``: one listing, one batched read."""
        folder = self._video_dir("shards", video_key)
        urls: dict[str, int] = {}
        for u in storage.list_files(folder, self.storage_options):
            rel = u[len(folder):].lstrip("/")
            m = _SHARD_FILE.match(rel)  # direct children only: "a" must not see "a/b"'s shards
            if m:
                urls[u] = int(m.group(1))
        blobs = storage.read_many(list(urls), self.storage_options)
        return {urls[u]: json.loads(blobs[u]) for u in sorted(urls, key=urls.__getitem__)}

    def write_state(self, video_key: str, index: int, state: dict[str, np.ndarray]) -> str:
        """Save shard ``index``'s outgoing state as npz (plain arrays only: it loads without pickle)."""
        arrays = {}
        for k, v in state.items():
            a = np.asarray(v)
            if a.dtype.hasobject:
                raise ValueError(f"state {k!r}: object arrays cannot be stored (they would need pickle)")
            arrays[k] = a
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        url = storage.join(self._video_dir("state", video_key), f"{self._shard_name(index)}.npz")
        return storage.write_bytes_atomic(url, buf.getvalue(), self.storage_options)

    def read_state(self, url: str) -> dict[str, np.ndarray]:
        """Load a state saved by ``write_state`` (only from inside this ledger, never with pickle)."""
        storage.check_inside(self.root, url)
        with np.load(io.BytesIO(storage.read_bytes(url, self.storage_options)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def part_url(self, video_key: str, name: str) -> str:
        """Where shards put their segments and overlap pieces: ``parts/<video_key>/<name>``."""
        return storage.safe_join(self._video_dir("parts", video_key), name)

    # ---- events ----------------------------------------------------------------------------------

    def append_event(self, event: dict[str, Any]) -> str:
        """One small JSON object per event, named so that names sort by time across writers."""
        event = {"time": time.time(), **event}
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        return self.write_json(f"events/{name}", event)

    def read_events(self) -> list[dict[str, Any]]:
        """All events in time order (by name)."""
        urls = storage.list_files(storage.join(self.root, "events"), self.storage_options)
        urls = [u for u in urls if u.endswith(".json")]
        blobs = storage.read_many(urls, self.storage_options)
        return [json.loads(blobs[u]) for u in sorted(urls)]
