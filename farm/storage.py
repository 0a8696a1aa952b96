"""fsspec I/O for outputs and ledgers: atomic writes, reads, listings and retries (URL helpers: ``farm.urls``;
errors and redaction: ``farm.errors``).

A final key appears only when complete. On object stores (s3, gs, az, ...) that is one put: a
PutObject, or a multipart upload that becomes visible when it completes. On a local filesystem the
bytes go to a hidden temporary name in the same directory, then ``os.replace``. Other filesystems get
the same temp-then-move, as atomic as their ``mv`` is. Transient errors (connection refused, timeouts,
5xx, throttling) are retried with exponential backoff; everything else fails at once as a
``StorageError`` whose one-line message names the URL and the reason, never the credentials.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Re-exported: ``storage.join``, ``storage.redact``, ``storage.StorageError``... are what callers use.
from farm.errors import StorageError, StorageNotFound, redact  # noqa: F401
from farm.errors import display_url as _display
from farm.urls import check_inside, join, safe_join, static_prefix  # noqa: F401

T = TypeVar("T")
log = logging.getLogger(__name__)

TMP_MARK = ".farm-tmp-"  # prefix of hidden temporaries; listings skip them
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"}
_CHUNK = 8 << 20



# ---- URLs ------------------------------------------------------------------------------------------


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a URL or local path; unknown protocols are a StorageError."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError, TypeError) as e:
        raise StorageError(_message(url, e, storage_options)) from None


# ---- errors, retries, redaction --------------------------------------------------------------------

def _message(url: str, error: BaseException, storage_options: dict[str, Any] | None) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return redact(f"{_display(url)}: {reason}", storage_options)


_TRANSIENT_NAMES = (
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientPayloadError", "ClientOSError", "IncompleteRead", "ResponseStreamingError", "FSTimeoutError",
)
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "BadGateway", "GatewayTimeout"}


def _chain(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: connection failures, timeouts, 5xx and throttling."""
    for e in _chain(error):
        if isinstance(e, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return True
        status = getattr(e, "code", None) or getattr(e, "status", None)  # gcsfs HttpError, aiohttp
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
    return False


def _backoff(attempt: int) -> float:
    """0.5, 1, 2, 4, 8 s (+-20 %): five retries span ~15 s, enough for a restarting server."""
    return min(8.0, 0.5 * 2**attempt) * random.uniform(0.8, 1.2)


def _retry(url: str, fn: Callable[[], T], storage_options: dict[str, Any] | None, retries: int = 5) -> T:
    """Run ``fn``, retrying transient errors; raise StorageError (or StorageNotFound) otherwise."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            if attempt < retries and is_transient(e):
                delay = _backoff(attempt)
                log.warning("%s; retry %d/%d in %.1f s", _message(url, e, storage_options), attempt + 1,
                            retries, delay)
                time.sleep(delay)
                continue
            cls = StorageNotFound if isinstance(e, FileNotFoundError) else StorageError
            why = "" if not is_transient(e) else f" (gave up after {retries + 1} attempts)"
            raise cls(_message(url, e, storage_options) + why) from None
    raise AssertionError("unreachable")


# ---- atomic writes ---------------------------------------------------------------------------------


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(set(_protocols(fs)) & _OBJECT_STORES)


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    # hidden, and not ending like the final name: a glob for ``*.png`` never picks up a temporary
    return posixpath.join(head, f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{tail}.part")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_then_replace(final_path: str) -> Iterator[str]:
    """A hidden temporary beside ``final_path``: moved into place on success, removed on failure,
    so a reader never sees a partial file under the final name."""
    tmp = _tmp_name(final_path)
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _local_write(path: str, fill: Callable[[Any], None]) -> None:
    """Write through ``fill(fileobj)`` to a hidden temp in the same directory, fsync, then rename."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with _temp_then_replace(path) as tmp, open(tmp, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(directory)


def _copy_from(local_path: str) -> Callable[[Any], None]:
    def fill(dst: Any) -> None:
        with open(local_path, "rb") as src:  # plain reads: works for pipes too
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
    return fill


def _generic_write(fs: fsspec.AbstractFileSystem, path: str, put: Callable[[str], None]) -> None:
    """Temp name beside the target, then ``mv``: as atomic as the filesystem's rename."""
    tmp = _tmp_name(path)
    try:
        put(tmp)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def put_file_atomic(local_path: str | os.PathLike[str], url: str,
                    storage_options: dict[str, Any] | None = None, retries: int = 5) -> str:
    """Upload a local file so that ``url`` appears only complete; returns ``url``."""
    local_path = os.fspath(local_path)
    fs, path = open_fs(url, storage_options)
    if not os.path.exists(local_path):
        raise StorageNotFound(f"{local_path}: no such local file (to upload to {_display(url)})")

    def attempt() -> None:
        if _is_local(fs):
            _local_write(path, _copy_from(local_path))
        elif "memory" in _protocols(fs):
            with open(local_path, "rb") as f:  # memory files are visible while open: put whole bytes
                fs.pipe_file(path, f.read())
        elif _is_object_store(fs):
            fs.put_file(local_path, path)  # one PutObject, or a multipart upload visible on completion
        else:
            _generic_write(fs, path, lambda tmp: fs.put_file(local_path, tmp))

    _retry(url, attempt, storage_options, retries)
    _forget(fs, path)
    return url


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None,
                       retries: int = 5) -> str:
    """Write ``data`` so that ``url`` appears only complete; returns ``url``."""
    fs, path = open_fs(url, storage_options)
    data = bytes(data)

    def attempt() -> None:
        if _is_local(fs):
            _local_write(path, lambda f: f.write(data))
        elif _is_object_store(fs):
            fs.pipe_file(path, data)
        else:
            _generic_write(fs, path, lambda tmp: fs.pipe_file(tmp, data))

    _retry(url, attempt, storage_options, retries)
    _forget(fs, path)
    return url


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _forget(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop cached listings: other processes write the same prefixes (shard records, parts)."""
    try:
        fs.invalidate_cache(path)
        fs.invalidate_cache(posixpath.dirname(path))
    except Exception:
        pass


# ---- reads and the rest ----------------------------------------------------------------------------


def read_bytes(url: str, storage_options: dict[str, Any] | None = None, retries: int = 5) -> bytes:
    """The whole object; StorageNotFound when it does not exist."""
    fs, path = open_fs(url, storage_options)
    return _retry(url, lambda: fs.cat_file(path), storage_options, retries)


def read_many(urls: list[str], storage_options: dict[str, Any] | None = None,
              retries: int = 5) -> dict[str, bytes]:
    """Several objects of one filesystem in one batched call (concurrent on object stores)."""
    if not urls:
        return {}
    fs, _ = open_fs(urls[0], storage_options)
    paths = {fs._strip_protocol(u): u for u in urls}

    def fetch() -> dict[str, bytes]:
        got = fs.cat(list(paths), on_error="raise")
        return {paths[p]: data for p, data in got.items()}

    return _retry(urls[0], fetch, storage_options, retries)


def exists(url: str, storage_options: dict[str, Any] | None = None, retries: int = 5) -> bool:
    """Whether ``url`` exists now (listing caches are dropped first: others write these prefixes)."""
    fs, path = open_fs(url, storage_options)

    def check() -> bool:
        _forget(fs, path)
        return bool(fs.exists(path))

    return _retry(url, check, storage_options, retries)


def get_file(url: str, local_path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
             retries: int = 5) -> str:
    """Download to ``local_path`` (via a temp name beside it, so it too appears only complete)."""
    local_path = os.fspath(local_path)
    fs, path = open_fs(url, storage_options)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)

    def fetch() -> None:
        with _temp_then_replace(os.path.abspath(local_path)) as tmp:
            fs.get_file(path, tmp)

    _retry(url, fetch, storage_options, retries)
    return local_path


def list_files(prefix_url: str, storage_options: dict[str, Any] | None = None,
               retries: int = 5) -> list[str]:
    """URLs of all files below ``prefix_url`` (recursive, sorted, temporaries skipped); [] if none."""
    fs, root = open_fs(prefix_url, storage_options)
    root = root.rstrip("/")

    def find() -> list[str]:
        _forget(fs, root)
        try:
            return list(fs.find(root))
        except FileNotFoundError:
            return []

    urls = []
    for p in sorted(_retry(prefix_url, find, storage_options, retries)):
        rel = p[len(root):].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        if not rel or any(_is_temporary(part) for part in rel.split("/")):
            continue
        urls.append(join(prefix_url, rel))
    return urls


def _is_temporary(name: str, suffix: str = "") -> bool:
    return name.startswith(TMP_MARK) and name.endswith(suffix)


def remove_temporaries(folder_url: str, storage_options: dict[str, Any] | None = None, of: str | None = None,
                       retries: int = 5) -> int:
    """Delete the temporaries left directly in a folder by writers killed mid-write (all of them, or
    only those of the final name ``of``); returns how many. Call it when nothing else writes them."""
    fs, root = open_fs(folder_url, storage_options)
    if _is_object_store(fs):
        return 0  # single puts there: no temporaries, and no listing of a prefix with many outputs
    suffix = f"-{of}.part" if of else ""

    def sweep() -> int:
        _forget(fs, root)
        try:
            names = fs.ls(root.rstrip("/"), detail=False)
        except FileNotFoundError:
            return 0
        stale = [p for p in names if _is_temporary(posixpath.basename(p.rstrip("/")), suffix)]
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(p)
        return len(stale)

    return _retry(folder_url, sweep, storage_options, retries)


def remove(url: str, storage_options: dict[str, Any] | None = None, recursive: bool = False,
           missing_ok: bool = True, retries: int = 5) -> None:
    """Delete a file (or a folder with ``recursive``); a missing one is fine unless ``missing_ok=False``."""
    fs, path = open_fs(url, storage_options)

    def rm() -> None:
        if not missing_ok and not fs.exists(path):  # S3 deletes of missing keys succeed silently
            raise FileNotFoundError(errno.ENOENT, "no such file or folder", path)
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as e:  # some filesystems say ENOENT without the subclass
            if e.errno != errno.ENOENT or not missing_ok:
                raise
        _forget(fs, path)

    _retry(url, rm, storage_options, retries)
