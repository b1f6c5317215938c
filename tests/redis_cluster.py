"""A local Redis Cluster of the tests' own: 3 masters and 3 replicas, each a ``redis-server`` on a
free port in a temp dir, joined with ``redis-cli --cluster create``. Node timeouts are short (1 s)
so that a killed master's replica is promoted within a few seconds."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from .conftest import wait_until


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


def ask(port: int, *command: str) -> Any:
    """One command to the node on ``port``, its reply as redis-py parses it (bytes for text)."""
    with redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=2) as client:
        try:
            return client.execute_command(*command)
        except redis.ResponseError as exc:
            return exc


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
                # A replica may take over however long it was cut off from its master (the
                # default refuses after 10 node timeouts, which a loaded test machine can reach).
                *("--cluster-replica-validity-factor", "0"),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
                *("--logfile", str(home / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: ask(port, "PING") is True, f"redis-server on {port}", 10)

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
        """Every running node says the cluster is ok, and every slot is served by a running master
        in every running node's view."""

        def healthy() -> bool:
            live = {port for port, process in self.processes.items() if process.poll() is None}
            for port in live:
                info = ask(port, "CLUSTER", "INFO")
                if b"cluster_state:ok" not in info or b"cluster_slots_ok:16384" not in info:
                    return False
                if any(int(entry[2][1]) not in live for entry in ask(port, "CLUSTER", "SLOTS")):
                    return False
            # And every running replica has its master's data (replication is up).
            for port in live:
                info = ask(port, "INFO", "replication")  # (parsed by redis-py)
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            return True

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
        return ask(port, "CLUSTER", "MYID").decode()

    def migrate_slot(self, slot: int, target: int, *, between: object = None) -> None:
        """Move ``slot`` to the master on port ``target`` the way ``redis-cli --cluster reshard``
        does: mark it importing and migrating, MIGRATE its keys a few at a time, then give it to
        the target on every master. ``between()`` runs once the first keys have moved (mid-way)."""
        source = self.master_of_slot(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        assert ask(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) in (True, b"OK")
        assert ask(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) in (True, b"OK")
        first = True
        while True:
            keys = [key.decode() for key in ask(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "2")]
            if not keys:
                break
            moved = ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys)
            assert moved in (True, b"OK", b"NOKEY"), moved
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
