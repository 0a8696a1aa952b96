"""A job's plan and progress, kept next to its output as small atomically written files (the av1an way).

The ledger owns every path under ``<static output prefix>/.farm/<job-id>/``; the driver and the workers
ask it for them::

    spec.json, plan.json             what was asked and how it was split
    shards/<video>/shard-0003.json   one done-marker per finished shard (a ShardRecord)
    shards/<video>/shard-0003.partial.json   a checkpointed shard's frames so far and its state (not done)
    state/<video>/shard-0003.npz     recurrent state handed to the next shard, so a resumed chain continues
    pass1/<video>/shard-0003.npz     a two-pass model's pass-1 output of a shard, read by pass 2
    parts/<video>/<channel>/...      segments and overlap pieces before assembly
    videos/<video>.json              a committed video's outputs (a VideoRecord): resume skips it
    events.json                      the run's event log, rewritten as it grows (``farm status`` reads it)
    manifest.json                    written last: its presence means the job finished

Resume reads the shard markers in one listing and skips what is done. State and pass-1 files load only
from inside the ledger and never with pickle.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from farm import storage

LEDGER_DIR = ".farm"
EVENTS = "events.json"
_SHARD_FILE = re.compile(r"^shard-(\d+)\.json$")
_PARTIAL_FILE = re.compile(r"^shard-(\d+)\.partial\.json$")


def ledger_root(spec: Any) -> str:
    """The ledger folder of a job spec: ``<static prefix of output.uri>/.farm/<job id>``."""
    return storage.join(storage.static_prefix(spec.output.uri), LEDGER_DIR, spec.job_id)


@dataclass
class ShardRecord:
    """What a finished shard left behind: its segments and overlap frames per channel, and its state.

    A checkpointed shard (``farm.drain``) leaves a *partial* record: ``stopped_at`` is the frame k its core
    pieces reach and ``state_url`` the state at k; the attempt that continues from k (``resumed_from``) adds
    its own piece, and ``join`` makes the shard's record of both (``"cores"``: the pieces in order)."""

    shard: dict[str, Any]  # the plan's Shard, as a dict: a record of another plan is not reused
    # channel -> {"core": piece, "head": npz URL, "tail": npz URL}; {"cores": [pieces], ...} when joined
    channels: dict[str, dict[str, Any]]
    seconds: float = 0.0
    rendered_frames: int = 0
    worker: dict[str, Any] = field(default_factory=dict)  # host, pid, node
    state_url: str | None = None  # the state handed to the next shard
    previous: str | None = None  # two-pass models: this shard's pass-1 output
    oom_splits: list[int] | None = None  # batch sizes that ran out of memory and were halved
    input: str | None = None  # the input's fingerprint when rendered: a changed input is rendered again
    stages: dict[str, float | None] | None = None  # where the shard's time went (the actor's pipeline stages)
    stopped_at: int | None = None  # partial: the core is rendered up to this frame (a checkpoint), state_url at it
    resumed_from: int | None = None  # this attempt continued a partial record from this frame

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def join(self, rest: ShardRecord) -> ShardRecord:
        """This partial record followed by ``rest``, the attempt that continued it from ``stopped_at``: the
        core pieces of both in order, this one's heads, ``rest``'s tail and state (or its own checkpoint)."""
        if self.stopped_at is None or rest.resumed_from != self.stopped_at:
            raise ValueError(f"shard {self.shard.get('index')}: a continuation from {rest.resumed_from} does not "
                             f"follow a partial record stopped at {self.stopped_at}")
        channels = {}
        for ch, entry in self.channels.items():
            later = rest.channels.get(ch, {})
            joined = {k: v for k, v in entry.items() if k not in ("core", "cores", "tail")}
            joined.update({k: v for k, v in later.items() if k not in ("core", "cores", "head")})
            joined["cores"] = core_pieces(entry) + core_pieces(later)
            channels[ch] = joined
        stages = dict(rest.stages or {})
        return replace(rest, channels=channels, seconds=self.seconds + rest.seconds, resumed_from=self.resumed_from,
                       rendered_frames=self.rendered_frames + rest.rendered_frames, stages=stages or None,
                       oom_splits=(self.oom_splits or []) + (rest.oom_splits or []) or None)


def core_pieces(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The core pieces of one channel of a shard record, in frame order (one, unless it was checkpointed)."""
    if "cores" in entry:
        return list(entry["cores"])
    return [entry["core"]] if "core" in entry else []


@dataclass
class VideoRecord:
    """A committed video: its outputs per channel, the input fingerprint they were rendered from, and its
    seams (``farm.stitch.seam_disagreement`` per overlap and output; kept for skipped re-runs and status)."""

    url: str
    outputs: dict[str, dict[str, Any]]
    input: str | None = None
    seams: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoRecord:
        return cls(d["url"], d.get("outputs") or {}, d.get("input"), list(d.get("seams") or []))


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

    def mark_shard_done(self, video_key: str, index: int, record: ShardRecord | dict[str, Any]) -> str:
        """Atomically record shard ``index`` of ``video_key`` as finished."""
        url = storage.join(self._video_dir("shards", video_key), f"{self._shard_name(index)}.json")
        doc = record.to_dict() if isinstance(record, ShardRecord) else record
        data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
        return storage.write_bytes_atomic(url, data, self.storage_options)

    def mark_shard_partial(self, video_key: str, index: int, record: ShardRecord) -> str:
        """Atomically record a checkpointed shard's frames so far and its state (``record.stopped_at``): not a
        done-marker, so a resumed job continues the shard from there."""
        url = storage.join(self._video_dir("shards", video_key), f"{self._shard_name(index)}.partial.json")
        data = json.dumps(record.to_dict(), indent=1, sort_keys=True, allow_nan=False).encode()
        return storage.write_bytes_atomic(url, data, self.storage_options)

    def partial_records(self, video_key: str) -> dict[int, ShardRecord]:
        """``{index: record}`` of the checkpointed (partial) shards of ``video_key``."""
        return {i: ShardRecord.from_dict(d) for i, d in self.done_shards(video_key, _PARTIAL_FILE).items()}

    def done_shards(self, video_key: str, pattern: re.Pattern[str] = _SHARD_FILE) -> dict[int, dict[str, Any]]:
        """``{index: record}`` of the finished shards of ``video_key``: one listing, one batched read."""
        folder = self._video_dir("shards", video_key)
        urls: dict[str, int] = {}
        for u in storage.list_files(folder, self.storage_options):
            rel = u[len(folder):].lstrip("/")
            m = pattern.match(rel)  # direct children only: "a" must not see "a/b"'s shards
            if m:
                urls[u] = int(m.group(1))
        blobs = storage.read_many(list(urls), self.storage_options)
        return {urls[u]: json.loads(blobs[u]) for u in sorted(urls, key=urls.__getitem__)}

    def shard_records(self, video_key: str) -> dict[int, ShardRecord]:
        """``done_shards`` as typed records."""
        return {i: ShardRecord.from_dict(d) for i, d in self.done_shards(video_key).items()}

    def _arrays_url(self, kind: str, video_key: str, name: int | str) -> str:
        name = self._shard_name(name) if isinstance(name, int) else name
        return storage.safe_join(self._video_dir(kind, video_key), f"{name}.npz")

    def write_arrays(self, url: str, arrays: dict[str, Any]) -> str:
        """npz of plain arrays only, so it loads without pickle; ``url`` must be inside this ledger."""
        storage.check_inside(self.root, url)
        out = {}
        for k, v in arrays.items():
            a = np.asarray(v)
            if a.dtype.hasobject:
                raise ValueError(f"state {k!r}: object arrays cannot be stored (they would need pickle)")
            out[k] = a
        buf = io.BytesIO()
        np.savez(buf, **out)
        return storage.write_bytes_atomic(url, buf.getvalue(), self.storage_options)

    def read_arrays(self, url: str) -> dict[str, np.ndarray]:
        """Load arrays saved by the ledger (state, pass 1, overlap frames): only from inside this ledger,
        never with pickle."""
        storage.check_inside(self.root, url)
        with np.load(io.BytesIO(storage.read_bytes(url, self.storage_options)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def write_state(self, video_key: str, shard: int | str, state: dict[str, Any]) -> str:
        """Save a shard's outgoing state (``shard``: its index, or its name such as ``refine-0002``)."""
        return self.write_arrays(self._arrays_url("state", video_key, shard), state)

    read_state = read_arrays

    def write_pass1(self, video_key: str, name: str, arrays: dict[str, Any]) -> str:
        """Save a two-pass model's pass-1 output of one shard attempt (``name``: shard name and copy tag)."""
        return self.write_arrays(self._arrays_url("pass1", video_key, name), arrays)

    def part_url(self, video_key: str, name: str) -> str:
        """Where shards put their segments and overlap pieces: ``parts/<video_key>/<name>``."""
        return storage.safe_join(self._video_dir("parts", video_key), name)

    def parts_url(self, video_key: str, channel: str) -> str:
        """The folder of one channel's pieces of a video: ``parts/<video_key>/<channel>``."""
        return self.part_url(video_key, channel)

    # ---- videos ----------------------------------------------------------------------------------

    def write_video(self, video_key: str, record: VideoRecord) -> str:
        return self.write_json(f"videos/{video_key}.json", asdict(record))

    def read_video(self, video_key: str) -> VideoRecord | None:
        doc = self.read_json(f"videos/{video_key}.json")
        return VideoRecord.from_dict(doc) if doc else None

    # ---- events ----------------------------------------------------------------------------------

    def write_events(self, events: list[dict[str, Any]]) -> str:
        """The run's event log, replaced whole (object stores cannot append)."""
        return self.write_json(EVENTS, events)

    def read_events(self) -> list[dict[str, Any]]:
        """The last run's events in order (empty before a run wrote any)."""
        return self.read_json(EVENTS, [])
