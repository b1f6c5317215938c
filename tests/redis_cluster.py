"""A local Redis Cluster of the tests' own: 3 masters and 3 replicas, each a ``redis-server`` on a
free port in a temp dir, joined with ``redis-cli --cluster create``. Node timeouts are short (1 s)
so that a killed master's replica is promoted within a few seconds."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port_pair() -> int:
    """A free port whose cluster-bus port (10000 higher) is free too (both below 65536)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port > 55535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


def ask(port: int, *command: str) -> bytes:
    """One command over a raw socket (RESP), the whole reply as bytes."""
    packed = b"*%d\r\n" % len(command) + b"".join(b"$%d\r\n%s\r\n" % (len(c), c.encode()) for c in command)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(packed)
        sock.settimeout(0.2)
        reply = b""
        with contextlib.suppress(TimeoutError, socket.timeout):
            while chunk := sock.recv(65536):
                reply += chunk
        return reply


def wait_until(condition: object, what: str, timeout: float = 30) -> None:
    """Until ``condition()`` (a server's own state, read over its socket) holds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if condition():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


class LocalCluster:
    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.directory = directory
        self.ports = [free_port_pair() for _ in range(masters * (1 + replicas))]
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def start_node(self, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for the Redis tests: see README, Prerequisites")
        home = self.directory / str(port)
        home.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                binary,
                *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(home)),
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", str(self.node_timeout_ms)),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                *("--logfile", str(home / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: ask(port, "PING").startswith(b"+PONG"), f"redis-server on {port}", 10)

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every running node says the cluster is ok, and all of them agree on its shape."""

        def healthy() -> bool:
            for port, process in self.processes.items():
                if process.poll() is not None:
                    continue
                if b"cluster_state:ok" not in ask(port, "CLUSTER", "INFO"):
                    return False
            check = subprocess.run(
                ["redis-cli", "--cluster", "check", f"127.0.0.1:{self.live_port()}"],
                capture_output=True,
                timeout=10,
            )
            return check.returncode == 0 and b"[OK] All 16384 slots covered" in check.stdout

        wait_until(healthy, "a healthy cluster", timeout)

    def live_port(self) -> int:
        return next(port for port, process in self.processes.items() if process.poll() is None)

    def masters(self) -> list[int]:
        """Ports of the masters that serve slots, by what a live node says."""
        out = []
        for line in ask(self.live_port(), "CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                out.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(out)

    def master_of_slot(self, slot: int) -> int:
        for line in ask(self.live_port(), "CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for item in fields[8:]:
                lo, _, hi = item.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(slot)

    def node_id(self, port: int) -> str:
        return ask(port, "CLUSTER", "MYID").split(b"\r\n")[1].decode()

    def migrate_slot(self, slot: int, target: int, *, between: object = None) -> None:
        """Move ``slot`` to the master on port ``target`` the way ``redis-cli --cluster reshard``
        does: mark it importing and migrating, MIGRATE its keys a few at a time, then give it to
        the target on every master. ``between()`` runs once the first keys have moved (mid-way)."""
        source = self.master_of_slot(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        assert ask(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id).startswith(b"+OK")
        assert ask(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id).startswith(b"+OK")
        first = True
        while True:
            reply = ask(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "2").split(b"\r\n")
            keys = [reply[i].decode() for i in range(2, len(reply), 2) if reply[i]]
            if not keys:
                break
            moved = ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
            assert moved.startswith(b"+"), moved
            if first and between is not None:
                between()  # type: ignore[operator]
            first = False
        for port in self.masters():
            ask(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)

    def kill(self, port: int) -> None:
        """SIGKILL: no shutdown, no last write."""
        process = self.processes[port]
        process.kill()
        process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


@contextlib.contextmanager
def local_cluster(directory: Path, **options: int) -> Iterator[LocalCluster]:
    cluster = LocalCluster(directory, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
