"""farm.storage against a local directory, memory:// and a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from farm import storage
from farm.storage import StorageError, StorageNotFound


@pytest.fixture(params=["local", "file", "memory", "s3"])
def where(request: pytest.FixtureRequest, tmp_path) -> tuple[str, dict]:
    """``(base_url, storage_options)`` of an empty folder on each kind of storage."""
    kind = request.param
    if kind == "local":
        return str(tmp_path / "out"), {}
    if kind == "file":
        return f"file://{tmp_path}/out", {}
    if kind == "memory":
        return f"memory://farm-test-{uuid.uuid4().hex}", {}
    s3 = request.getfixturevalue("s3")
    return s3.make_bucket() + "/renders", s3.storage_options


# ---- URL helpers ---------------------------------------------------------------------------------


def test_join_and_static_prefix() -> None:
    assert storage.join("s3://b", "x", "y.json") == "s3://b/x/y.json"
    assert storage.join("s3://b/", "/x/") == "s3://b/x"
    assert storage.join("/tmp/out", "a") == "/tmp/out/a"
    assert storage.static_prefix("s3://b/renders/{job}/{stem}_{channel}.mp4") == "s3://b/renders"
    assert storage.static_prefix("s3://b/{job}.mp4") == "s3://b"
    assert storage.static_prefix("/data/out/{stem}/{channel}.mp4") == "/data/out"
    assert storage.static_prefix("out/x{stem}.mp4") == "out"
    assert storage.static_prefix("{stem}.mp4") == "."
    assert storage.static_prefix("file:///data/o/{stem}.mp4") == "file:///data/o"
    with pytest.raises(StorageError, match="bucket"):
        storage.static_prefix("s3://{bucket}/x.mp4")


@pytest.mark.parametrize("bad", [
    "../x", "/etc/passwd", "s3://other/x", "a/../../x", "a/..", "..", "a\\..\\x", "C:/x", "", "./", "//",
    "~/x", "a/\x00b",
])
def test_safe_join_refuses_escapes(bad: str) -> None:
    with pytest.raises(StorageError, match="refused"):
        storage.safe_join("s3://bucket/prefix", bad)


def test_safe_join_and_check_inside() -> None:
    assert storage.safe_join("s3://b/p", "a/./b//c.json") == "s3://b/p/a/b/c.json"
    assert storage.safe_join("/tmp/p", "x") == "/tmp/p/x"
    assert storage.check_inside("s3://b/p", "s3://b/p/x/y") == "s3://b/p/x/y"
    assert storage.check_inside("/tmp/p", "file:///tmp/p/x")
    for url in ["s3://b/px", "s3://other/p/x", "s3://b/p", "s3://b/p/../q", "gs://b/p/x", "/b/p/x"]:
        with pytest.raises(StorageError, match="refused"):
            storage.check_inside("s3://b/p", url)


# ---- redaction -----------------------------------------------------------------------------------


def test_redact_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secret, session, env_secret = "wJalrXUtnFEMI-K7MDENG", "FwoGZXIvYXdzE-session", "env-secret-9f8e7d"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    so = {
        "key": "AKIAEXAMPLEKEY", "secret": secret, "endpoint_url_is_fine": "x",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": session},
        "token": {"private_key": "-----BEGIN PRIVATE KEY-----abc"},
    }
    text = (f"failed with key=AKIAEXAMPLEKEY secret={secret} token={session} env={env_secret} "
            f"pk=-----BEGIN PRIVATE KEY-----abc url=https://user:hunter22@host/x endpoint=http://127.0.0.1:9000")
    out = storage.redact(text, so)
    for s in ["AKIAEXAMPLEKEY", secret, session, env_secret, "BEGIN PRIVATE KEY", "hunter22"]:
        assert s not in out
    assert "***" in out and "http://127.0.0.1:9000" in out  # endpoints stay readable


# ---- retries -------------------------------------------------------------------------------------


def test_retry_transient_then_success(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_backoff", lambda attempt: 0.0)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert storage._retry("s3://b/x", flaky, None, retries=5) == "ok"
    assert len(calls) == 3


def test_retry_gives_up_and_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_backoff", lambda attempt: 0.0)
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(StorageError, match=r"s3://b/x: TimeoutError: timed out \(gave up after 3 attempts\)"):
        storage._retry("s3://b/x", down, None, retries=2)
    assert len(calls) == 3

    calls.clear()

    def denied() -> None:
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(StorageError, match="Access Denied"):
        storage._retry("s3://b/x", denied, None, retries=5)
    assert len(calls) == 1


# ---- every operation, on every storage -----------------------------------------------------------


def test_roundtrip(where: tuple[str, dict], tmp_path) -> None:
    base, so = where
    assert storage.list_files(base, so) == []
    a = storage.join(base, "a", "one.bin")
    assert not storage.exists(a, so)
    assert storage.write_bytes_atomic(a, b"hello", so) == a
    assert storage.exists(a, so)
    assert storage.read_bytes(a, so) == b"hello"
    storage.write_bytes_atomic(a, b"replaced", so)
    assert storage.read_bytes(a, so) == b"replaced"

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    b = storage.join(base, "b", "c", "two.bin")
    storage.put_file_atomic(src, b, so)
    dst = tmp_path / "dl" / "two.bin"
    assert storage.get_file(b, dst, so) == str(dst)
    assert dst.read_bytes() == src.read_bytes()
    assert storage.list_files(base, so) == [a, b]
    assert storage.read_many([a, b], so) == {a: b"replaced", b: src.read_bytes()}

    storage.remove(a, so)
    assert not storage.exists(a, so)
    storage.remove(a, so)  # missing is fine
    with pytest.raises(StorageNotFound):
        storage.remove(a, so, missing_ok=False)
    with pytest.raises(StorageNotFound, match="one.bin"):
        storage.read_bytes(a, so)
    with pytest.raises(StorageNotFound):
        storage.get_file(a, tmp_path / "nope.bin", so)
    assert not (tmp_path / "nope.bin").exists()
    assert storage.list_files(base, so) == [b]


def test_local_leaves_no_temporaries(tmp_path) -> None:
    base = str(tmp_path / "out")
    for i in range(5):
        storage.write_bytes_atomic(storage.join(base, f"{i}.json"), b"{}")
    assert sorted(os.listdir(base)) == [f"{i}.json" for i in range(5)]


def test_local_failed_write_leaves_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "out" / "x.bin")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="x.bin: OSError"):
        storage.write_bytes_atomic(url, b"data")
    assert os.listdir(tmp_path / "out") == []


def test_local_no_partial_file_during_slow_write(tmp_path) -> None:
    """A reader polling the final path sees nothing, then the whole file; never a prefix of it."""
    fifo = tmp_path / "feed"
    os.mkfifo(fifo)
    final = tmp_path / "out" / "big.bin"
    chunk, n = b"x" * (256 << 10), 12
    seen: dict[str, object] = {"partial": None, "tmp": False, "polls": 0}
    done = threading.Event()

    def feed() -> None:
        with open(fifo, "wb") as f:
            for _ in range(n):
                f.write(chunk)
                f.flush()
                time.sleep(0.03)

    def poll() -> None:
        while not done.is_set():
            seen["polls"] = int(seen["polls"]) + 1  # type: ignore[call-overload]
            if final.exists():
                size = final.stat().st_size
                if size != len(chunk) * n:
                    seen["partial"] = size
            names = os.listdir(final.parent) if final.parent.exists() else []
            temps = [name for name in names if name.startswith(storage.TMP_MARK)]
            if temps:
                seen["tmp"] = True
            like_final = [name for name in temps if name.endswith(".bin")]  # a glob for outputs finds these
            if like_final:
                seen["tmp_like_final"] = like_final
            time.sleep(0.002)

    threads = [threading.Thread(target=feed), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    try:
        storage.put_file_atomic(fifo, str(final))
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert seen["tmp"], "the poller never saw the write in progress"
    assert seen["partial"] is None, f"saw a partial file of {seen['partial']} bytes"
    assert "tmp_like_final" not in seen, seen
    assert final.stat().st_size == len(chunk) * n
    assert os.listdir(final.parent) == ["big.bin"]


def test_remove_temporaries_of_killed_writers(where: tuple[str, dict]) -> None:
    """Temporaries a killed writer left in a folder go; outputs, and other names' temporaries with
    ``of``, stay (local disk and file://, where writes go through a temporary and a rename)."""
    base, so = where
    if base.startswith(("s3://", "memory://")):
        pytest.skip("object stores take single puts: nothing leaves a temporary there")
    folder = storage.join(base, "seq")
    storage.write_bytes_atomic(storage.join(folder, "000000.png"), b"frame", so)
    for name in ("000001.png", "x.mp4"):  # what a writer killed between write and rename leaves
        fs, path = storage.open_fs(storage._tmp_name(storage.join(folder, name)), so)
        fs.pipe_file(path, b"half")
    assert storage.remove_temporaries(folder, so, of="x.mp4") == 1
    assert storage.remove_temporaries(folder, so) == 1
    assert storage.remove_temporaries(folder, so) == 0
    fs, path = storage.open_fs(folder, so)
    fs.invalidate_cache()
    assert [p.rstrip("/").rsplit("/", 1)[1] for p in fs.ls(path, detail=False)] == ["000000.png"]
    assert storage.remove_temporaries(storage.join(base, "missing"), so) == 0


# ---- S3 specifics --------------------------------------------------------------------------------


def test_s3_no_partial_object_during_large_put(s3, tmp_path) -> None:
    base, so = s3.make_bucket(), s3.storage_options
    url = storage.join(base, "big", "video.mp4")
    src = tmp_path / "big.bin"
    payload = os.urandom(24 << 20)
    src.write_bytes(payload)
    seen: dict[str, object] = {"polls": 0, "bad": None, "before": 0}
    done = threading.Event()
    fs, path = storage.open_fs(url, so)

    def poll() -> None:
        while not done.is_set():
            seen["polls"] = int(seen["polls"]) + 1  # type: ignore[call-overload]
            if storage.exists(url, so):
                size = fs.info(path)["size"]
                if size != len(payload):
                    seen["bad"] = size
            else:
                seen["before"] = int(seen["before"]) + 1  # type: ignore[call-overload]

    t = threading.Thread(target=poll)
    t.start()
    try:
        time.sleep(0.05)
        storage.put_file_atomic(src, url, so)
    finally:
        done.set()
        t.join(10)
    assert seen["bad"] is None, f"saw a partial object of {seen['bad']} bytes"
    assert int(seen["before"]) > 0  # type: ignore[call-overload]
    assert storage.read_bytes(url, so) == payload


def test_s3_unauthenticated_access_fails(s3) -> None:
    base = s3.make_bucket()
    url = storage.join(base, "x.json")
    storage.write_bytes_atomic(url, b"{}", s3.storage_options)
    endpoint = {"client_kwargs": {"endpoint_url": s3.endpoint_url}, "skip_instance_cache": True}
    wrong = {"key": s3.key, "secret": "not-the-secret-" + uuid.uuid4().hex, **endpoint}
    for so in ({"anon": True, **endpoint}, wrong):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            storage.read_bytes(url, so)
        with pytest.raises(StorageError):
            storage.write_bytes_atomic(storage.join(base, "y.json"), b"{}", so)
        assert time.monotonic() - t0 < 10, "permission errors must not be retried"
        msg = str(err.value)
        assert msg.startswith(url) and "\n" not in msg
        assert s3.secret not in msg and wrong["secret"] not in msg
    assert not storage.exists(storage.join(base, "y.json"), s3.storage_options)


def test_s3_missing_bucket_fails_fast(s3) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:10]}/x.json"
    t0 = time.monotonic()
    with pytest.raises(StorageNotFound, match="no-such-bucket"):
        storage.write_bytes_atomic(url, b"{}", s3.storage_options)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("inner", ["botocore-retries", "farm-retries-only"])
def test_s3_put_survives_server_restart(s3, tmp_path, inner: str) -> None:
    """S3 is down when the put starts and comes back ~3 s later: the retries carry the put through.

    botocore retries connection errors itself (~9 s per call by default); with its retries off, the
    put must be carried by farm's own backoff alone.
    """
    base, so = s3.make_bucket(), dict(s3.storage_options)
    if inner == "farm-retries-only":
        so.update(config_kwargs={"retries": {"max_attempts": 1}}, skip_instance_cache=True)
    src = tmp_path / "seg.mp4"
    payload = os.urandom(3 << 20)
    src.write_bytes(payload)
    url = storage.join(base, "parts", "seg.mp4")
    s3.stop()
    relaunched = threading.Event()

    def start() -> None:
        relaunched.set()  # set before the launch: the put may finish before start() sees the server ready
        s3.start()

    restart = threading.Timer(3.0, start)
    restart.start()
    try:
        storage.put_file_atomic(src, url, so)
        came_back_first = relaunched.is_set()  # the put could only succeed once the server was relaunched
    finally:
        restart.join(60)
        s3.start()  # no-op when the timer already restarted it
    assert came_back_first
    assert storage.read_bytes(url, so) == payload
