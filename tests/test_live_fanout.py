"""Long-poll fan-out across real server processes on one Redis: 500 readers split over two
processes, one writer through one of them. Every reader gets every message, in order, once
(wake-ups cross processes through pub/sub), both when each message waits for every reader and
when messages come back to back, landing while readers read and check. For the first part the
Redis round trips are counted: readers woken together share their reads and checks, so the
script calls per message stay far below one per reader."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .conftest import free_port, redis_server, spawn, stop, unique_prefix
from .test_conformance import serve_args

READERS = 500
MESSAGES = 20  # one at a time: each a wake-up of every reader (the round trips are counted)
RACING = 30  # then back to back, with no waiting: writes land while readers read and check
TOTAL = MESSAGES + RACING


class _Connection:
    """A keep-alive HTTP/1.1 connection, as lean as the load it makes (no client library)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        head = f"{method} {target} HTTP/1.1\r\nHost: t\r\n"
        if method in ("PUT", "POST"):
            head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            if value:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        return int(status_line.split()[1]), headers, await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[tuple[list[int], redis.Redis]]:
    """Two server processes on a Redis of this test's own (its command counts are ours alone)."""
    with redis_server(tmp_path / "redis") as url:
        prefix = unique_prefix()
        ports = [free_port(), free_port()]
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for i, port in enumerate(ports):
                # Long-polls that time out would count as round trips too: none within the test.
                args = serve_args(port, url, 1, prefix, long_poll_seconds=60)
                processes.append(spawn(args, tmp_path / f"server-{i}.log", f"http://127.0.0.1:{port}/healthz"))
            client = redis.Redis.from_url(url)
            yield ports, client
            client.close()
        finally:
            for process in processes:
                stop(process)
        for i in range(len(ports)):
            assert "Traceback" not in (tmp_path / f"server-{i}.log").read_text()


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_500_long_poll_readers_on_two_processes_get_every_message_once(
    two_processes: tuple[list[int], redis.Redis],
) -> None:
    ports, client = two_processes
    path = "/v1/stream/fanout"
    setup = await _Connection.open(ports[0])
    status, _, _ = await setup.request("PUT", path)
    assert status == 201
    received: list[list[int]] = [[] for _ in range(READERS)]
    # How many readers have had message n; the writer waits for all of them before the next, so
    # that each message is its own wake-up of every reader.
    arrived = [0] * TOTAL
    everyone = [asyncio.Event() for _ in range(TOTAL)]
    ready = 0
    all_ready = asyncio.Event()

    async def read(i: int) -> None:
        nonlocal ready
        connection = await _Connection.open(ports[i % 2])
        try:
            status, headers, _ = await connection.request("GET", f"{path}?offset=now")
            assert status == 200, status
            offset, cursor = headers["stream-next-offset"], ""
            ready += 1
            if ready == READERS:
                all_ready.set()
            while len(received[i]) < TOTAL:
                target = f"{path}?offset={offset}&live=long-poll" + (f"&cursor={cursor}" if cursor else "")
                status, headers, body = await connection.request("GET", target)
                assert status in (200, 204), status
                offset, cursor = headers["stream-next-offset"], headers.get("stream-cursor", cursor)
                for line in body.decode().splitlines():
                    n = int(line)
                    received[i].append(n)
                    arrived[n] += 1
                    if arrived[n] == READERS:
                        everyone[n].set()
        finally:
            connection.close()

    readers = [asyncio.ensure_future(read(i)) for i in range(READERS)]
    try:
        await asyncio.wait_for(all_ready.wait(), 60)
        before = _script_calls(client)
        writer = await _Connection.open(ports[0])
        for n in range(MESSAGES):
            status, _, _ = await writer.request("POST", path, f"{n}\n".encode())
            assert status == 204, status
            await asyncio.wait_for(everyone[n].wait(), 30)
        calls = _script_calls(client) - before - MESSAGES  # (the appends' own)
        for n in range(MESSAGES, TOTAL):
            status, _, _ = await writer.request("POST", path, f"{n}\n".encode())
            assert status == 204, status
        await asyncio.wait_for(asyncio.gather(*readers), 30)
        writer.close()
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        setup.close()
    assert all(got == list(range(TOTAL)) for got in received), "a reader missed, repeated or reordered messages"
    deliveries = READERS * MESSAGES
    per_delivery = calls / deliveries
    print(
        f"long-poll fan-out, {READERS} readers on 2 processes, {MESSAGES} messages: {deliveries} deliveries, "
        f"{calls} script calls to Redis besides the appends ({per_delivery:.3f} per delivery, "
        f"{calls / MESSAGES / len(ports):.1f} per message per process)"
    )
    # One read and one check per reader and message would be 2 per delivery: sharing keeps it a
    # small fraction of that (what is left are readers whose next request came after the shared
    # call had gone out).
    assert per_delivery < 0.25, per_delivery
