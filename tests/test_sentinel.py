"""Redis behind Sentinel, with real servers: one master, one replica and three sentinels started
on free ports in temp dirs. The master is SIGKILLed under a writer and a live reader; the replica
is promoted, writes go on through the new master, the reader is woken, and everything that was
acknowledged (and had reached the replica) is still there, once."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from durable_streams_asgi.storage.base import AppendRequest, StorageUnavailable, StreamConfig
from durable_streams_asgi.storage.redis import RedisStorage

from .conftest import RedisServer, free_port, unique_prefix, wait_until

SERVICE = "ds-test"


def _ask(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(command)
        return sock.recv(65536)


class Sentinels:
    def __init__(self, directory: Path, master_port: int) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        binary = shutil.which("redis-server")
        assert binary is not None
        for i, port in enumerate(self.ports):
            home = directory / f"sentinel{i}"
            home.mkdir()
            conf = home / "sentinel.conf"  # sentinels rewrite their configuration: a file of their own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {home}\nlogfile {home / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.processes.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        for port in self.ports:
            wait_until(lambda port=port: _ask(port, b"PING\r\n").startswith(b"+PONG"), f"sentinel on {port}", 20)

    def master_port(self) -> int:
        reply = _ask(self.ports[0], f"SENTINEL get-master-addr-by-name {SERVICE}\r\n".encode())
        return int(reply.split(b"\r\n")[4])

    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{SERVICE}/0"

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, Sentinels]]:
    master = RedisServer(tmp_path / "master")
    master.start()
    replica = RedisServer(tmp_path / "replica")
    replica.start()
    _ask(replica.port, f"REPLICAOF 127.0.0.1 {master.port}\r\n".encode())
    wait_until(lambda: b"master_link_status:up" in _ask(replica.port, b"INFO replication\r\n"), "replication", 20)
    sentinels = Sentinels(tmp_path, master.port)
    # Every sentinel knows the replica and the other sentinels before a failover can be voted.
    for port in sentinels.ports:
        wait_until(
            lambda port=port: (
                b"num-slaves\r\n$1\r\n1" in _ask(port, f"SENTINEL master {SERVICE}\r\n".encode())
                and b"num-other-sentinels\r\n$1\r\n2" in _ask(port, f"SENTINEL master {SERVICE}\r\n".encode())
            ),
            "sentinels seeing each other and the replica",
            20,
        )
    try:
        yield master, replica, sentinels
    finally:
        sentinels.stop()
        replica.stop()
        master.stop()


async def test_writes_and_live_reads_follow_a_failover(
    sentinel_setup: tuple[RedisServer, RedisServer, Sentinels],
) -> None:
    master, replica, sentinels = sentinel_setup
    storage = RedisStorage.from_url(sentinels.url(), key_prefix=unique_prefix())
    try:
        await storage.create("/s", StreamConfig(content_type="text/plain"))
        acknowledged = []
        for i in range(20):
            await storage.append("/s", AppendRequest("text/plain", [f"{i},".encode()]))
            acknowledged.append(i)
        tail = (await storage.head("/s")).tail
        # Replication is asynchronous: wait until the replica has all of it, so that what this
        # test counts as lost is what a failover loses, not what was still in flight.
        await asyncio.to_thread(
            wait_until,
            lambda: _ask(master.port, b"WAIT 1 0\r\n").startswith(b":1"),
            "the replica catching up",
            20,
        )
        reader = asyncio.ensure_future(storage.wait_for_data("/s", tail, 60))
        await asyncio.sleep(0.2)  # the reader's subscription is confirmed before its check; this only lets it start
        master.kill()
        started = time.monotonic()
        unavailable = 0
        while True:  # the writer retries through the failover, as a client does on 503
            try:
                await storage.append("/s", AppendRequest("text/plain", [b"after,"]))
                break
            except StorageUnavailable:
                unavailable += 1
                if time.monotonic() - started > 30:
                    pytest.fail("writes did not resume within 30 s of the master's death")
                await asyncio.sleep(0.2)
        window = time.monotonic() - started
        assert sentinels.master_port() == replica.port
        assert await asyncio.wait_for(reader, 30)  # woken: by the reconnect, or by the append
        data = b"".join((await storage.read("/s", 0, 1 << 20)).items).decode()
        assert data == "".join(f"{i}," for i in acknowledged) + "after,"
        print(f"failover: writes resumed after {window:.1f} s, {unavailable} appends answered unavailable")
    finally:
        await storage.aclose()


def test_serve_takes_a_sentinel_url(sentinel_setup: tuple[RedisServer, RedisServer, Sentinels], tmp_path: Path) -> None:
    import httpx

    from .conftest import spawn, stop

    _, _, sentinels = sentinel_setup
    port = free_port()
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--storage", sentinels.url()]
    process = spawn(
        [*args, "--key-prefix", unique_prefix(), "--log-level", "warning"],
        tmp_path / "serve.log",
        f"http://127.0.0.1:{port}/readyz",
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1/stream") as client:
            assert client.put("/x", headers={"content-type": "text/plain"}, content=b"hi").status_code == 201
            assert client.get("/x", params={"offset": "-1"}).content == b"hi"
    finally:
        stop(process)
