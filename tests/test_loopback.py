"""The Ray that ``farm submit`` starts on its own (``ensure_ray``) listens on loopback only: GCS, raylet,
dashboard and its agent, runtime-env agent, metrics exporters, the driver's and workers' gRPC servers.

Sockets are read from ``/proc`` (``/proc/net/tcp*`` joined with each process's socket fds), for every
process of that Ray: the submitting process and all its descendants. Linux only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from Linux /proc")

# Starts farm's embedded Ray, runs a task and an actor (so worker processes are up), then waits for the test.
START = """
import os, sys
import ray
from farm.driver import ensure_ray
ensure_ray(num_cpus=1)

@ray.remote
class A:
    def pid(self):
        return os.getpid()

a = A.remote()
ray.get(a.pid.remote())
ray.get(ray.remote(lambda: 1).remote())
print("READY", flush=True)
sys.stdin.read()
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the comm field may hold spaces: split after it
        children.setdefault(ppid, []).append(int(name))
    out, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _listening_by_inode() -> dict[int, tuple[str, int]]:
    """inode -> (ip, port) of every listening TCP socket on the machine."""
    found = {}
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        if not Path(path).exists():
            continue
        for line in Path(path).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(f[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def listening_sockets(pids: set[int]) -> list[tuple[str, int, str]]:
    """(ip, port, process) for each listening TCP socket held by one of ``pids``."""
    by_inode, out = _listening_by_inode(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in by_inode:
                out.append((*by_inode[int(link[8:-1])], name.strip()))
    return sorted(set(out))


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, a dual-stack socket bound to IPv4 loopback
    return addr.is_loopback


def sockets_of_farm_ray(tmp_path: Path, env: dict[str, str]) -> list[tuple[str, int, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", START],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", line
        return listening_sockets(_descendants(proc.pid))
    finally:
        proc.stdin.close()  # the script returns, and ray.shutdown at exit stops its processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **extra}


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only(tmp_path) -> None:
    sockets = sockets_of_farm_ray(tmp_path, clean_env())
    names = " ".join(s[2] for s in sockets)
    # the probe sees the servers that matter: GCS, raylet, dashboard, agents, a worker
    for part in ("gcs_server", "raylet", "dashboard", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::A"):
        assert part in names, (part, sockets)
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, exposed


@pytest.mark.slow
def test_probe_sees_ray_on_other_interfaces(tmp_path) -> None:
    """Control: with Ray's own choice (the variable set by the user), Ray listens beyond loopback and the
    probe says so, so the test above can fail."""
    sockets = sockets_of_farm_ray(tmp_path, clean_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1"))
    assert any(not is_loopback(s[0]) for s in sockets), sockets
