"""farm.ledger on a local directory, memory:// and a real SeaweedFS S3 server."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from farm import storage
from farm.ledger import Ledger
from farm.storage import StorageError


@pytest.fixture(params=["local", "memory", "s3"])
def prefix(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict]:
    """``(static output prefix, storage_options)``: where a job's outputs and ledger go."""
    if request.param == "local":
        return str(tmp_path / "renders"), {}
    if request.param == "memory":
        return f"memory://ledger-test-{uuid.uuid4().hex}/renders", {}
    s3 = request.getfixturevalue("s3")
    return s3.make_bucket() + "/renders", s3.storage_options


def test_layout_and_documents(prefix: tuple[str, dict]) -> None:
    base, so = prefix
    assert Ledger.find(base, "job-1", so) is None
    ledger = Ledger.for_job(base, "job-1", so)
    assert ledger.root == f"{base}/.farm/job-1"
    assert ledger.read_spec() is None and ledger.read_manifest() is None
    assert ledger.read_json("videos/a.json", default={}) == {}

    spec = {"job": "job-1", "model": {"name": "keyer"}, "inputs": ["a.mp4"]}
    assert ledger.write_spec(spec) == f"{ledger.root}/spec.json"
    ledger.write_plan({"mode": "none", "videos": {"a": [[0, 16]]}})
    assert ledger.read_spec() == spec
    assert ledger.read_plan()["videos"] == {"a": [[0, 16]]}

    found = Ledger.find(base, "job-1", so)
    assert found is not None and found.root == ledger.root and found.read_spec() == spec
    assert Ledger.find(base, "job-2", so) is None

    ledger.write_json("videos/a.json", {"outputs": {"alpha": {"url": "x"}}})
    assert ledger.read_json("videos/a.json") == {"outputs": {"alpha": {"url": "x"}}}
    assert ledger.write_manifest({"outputs": 1}) == f"{ledger.root}/manifest.json"
    assert ledger.read_manifest() == {"outputs": 1}


def test_shard_records(prefix: tuple[str, dict]) -> None:
    base, so = prefix
    ledger = Ledger.for_job(base, "job-1", so)
    assert ledger.done_shards("clip") == {}
    for i in (3, 0, 1):
        url = ledger.mark_shard_done("clip", i, {"url": f"seg-{i}.mp4", "sha256": "ab" * 32, "frames": 16})
        assert url == f"{ledger.root}/shards/clip/shard-{i:04d}.json"
    ledger.mark_shard_done("clip/extra", 7, {"url": "nested"})  # a nested key is its own video
    ledger.mark_shard_done("other", 0, {"url": "o"})
    ledger.mark_shard_done("clip", 1, {"url": "seg-1-again.mp4"})  # a re-run replaces the record

    done = ledger.done_shards("clip")
    assert list(done) == [0, 1, 3]
    assert done[3] == {"url": "seg-3.mp4", "sha256": "ab" * 32, "frames": 16}
    assert done[1] == {"url": "seg-1-again.mp4"}
    assert ledger.done_shards("other") == {0: {"url": "o"}}
    with pytest.raises(ValueError):
        ledger.mark_shard_done("clip", -1, {})


def test_state_roundtrip(prefix: tuple[str, dict]) -> None:
    base, so = prefix
    ledger = Ledger.for_job(base, "job-1", so)
    rng = np.random.default_rng(0)
    state = {"r1": rng.standard_normal((1, 16, 8, 8)).astype(np.float16), "step": np.array(5, np.int64)}
    url = ledger.write_state("clip", 2, state)
    assert url == f"{ledger.root}/state/clip/shard-0002.npz"
    back = ledger.read_state(url)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])

    with pytest.raises(ValueError, match="pickle"):
        ledger.write_state("clip", 3, {"bad": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(StorageError, match="not inside"):
        ledger.read_state(storage.join(base, "elsewhere.npz"))


def test_parts_and_escapes(prefix: tuple[str, dict]) -> None:
    base, so = prefix
    ledger = Ledger.for_job(base, "job-1", so)
    assert ledger.part_url("clip", "alpha/shard-0001.mp4") == f"{ledger.root}/parts/clip/alpha/shard-0001.mp4"
    for bad in ("../x", "/etc/passwd", "s3://other/x", "a/../../x"):
        with pytest.raises(StorageError, match="refused"):
            ledger.part_url("clip", bad)
        with pytest.raises(StorageError, match="refused"):
            ledger.part_url(bad, "x.mp4")
        with pytest.raises(StorageError, match="refused"):
            ledger.write_json(bad, {})
        with pytest.raises(StorageError, match="refused"):
            Ledger.for_job(base, bad, so)
    assert storage.list_files(base, so) == []  # nothing was written by the refused calls


def test_events(prefix: tuple[str, dict]) -> None:
    base, so = prefix
    ledger = Ledger.for_job(base, "job-1", so)
    assert ledger.read_events() == []
    for n in range(1, 5):  # the run's one log, rewritten as it grows
        ledger.write_events([{"event": "shard_done", "i": i, "t": float(i)} for i in range(n)])
    events = ledger.read_events()
    assert [e["i"] for e in events] == [0, 1, 2, 3]
    assert all(e["event"] == "shard_done" and isinstance(e["t"], float) for e in events)
    assert storage.list_files(ledger.root, so) == [storage.join(ledger.root, "events.json")]


def test_records_are_typed(prefix: tuple[str, dict]) -> None:
    from farm.ledger import ShardRecord, VideoRecord

    base, so = prefix
    ledger = Ledger.for_job(base, "job-1", so)
    rec = ShardRecord(shard={"index": 0}, channels={"alpha": {"core": {"start": 0, "frames": 8}}}, seconds=1.5,
                      input="fp")
    ledger.mark_shard_done("clip", 0, rec)
    assert ledger.shard_records("clip") == {0: rec}
    assert "state_url" not in ledger.done_shards("clip")[0]  # unset fields are not written
    assert ledger.read_video("clip") is None
    ledger.write_video("clip", VideoRecord("in.mp4", {"alpha": {"url": "out.mp4"}}, "fp"))
    assert ledger.read_video("clip") == VideoRecord("in.mp4", {"alpha": {"url": "out.mp4"}}, "fp")
    url = ledger.write_pass1("clip", "shard-0000.copy1", {"alpha": np.zeros((2, 2), np.uint8)})
    assert url.endswith("pass1/clip/shard-0000.copy1.npz") and ledger.read_arrays(url)["alpha"].shape == (2, 2)
