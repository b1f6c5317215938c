"""Faults, as an operator meets them: real redis-server, real server processes (the CLI), real
clients over sockets. Redis SIGKILLed and restarted (AOF) under writers and readers; a worker
SIGKILLed under SSE readers, who resume through the other; Redis paused (CLIENT PAUSE).

What must hold: every acknowledged write is there exactly once (an unacknowledged one at most
once), and every reader finishes with each message once, in order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from .conftest import RedisServer, free_port, spawn, sse_events, stop, unique_prefix

pytestmark = pytest.mark.timeout(180)
JSON_CT = {"Content-Type": "application/json"}


class Servers:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[Any, Path]] = []

    def serve(self, redis_url: str, prefix: str) -> tuple[str, Any]:
        port = free_port()
        args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--storage", redis_url]
        args += ["--key-prefix", prefix, "--long-poll-timeout", "2", "--log-level", "warning"]
        log = self.tmp_path / f"server-{port}.log"
        process = spawn(args, log, f"http://127.0.0.1:{port}/healthz")
        self.started.append((process, log))
        return f"http://127.0.0.1:{port}/v1/stream", process


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    made = Servers(tmp_path)
    yield made
    for process, _ in made.started:
        stop(process)
    for process, log in made.started:
        if process.returncode != -signal.SIGKILL:
            text = log.read_text()
            assert "Traceback" not in text, text[-4000:]


async def read_all(base: str, path: str) -> list[Any]:
    """The whole stream, by catch-up reads."""
    messages: list[Any] = []
    offset = "-1"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while True:
            response = await client.get(path, params={"offset": offset})
            assert response.status_code == 200, response.text
            messages.extend(response.json())
            offset = response.headers["stream-next-offset"]
            if response.headers.get("stream-up-to-date") == "true":
                return messages


async def follow(bases: list[str], path: str, deadline: float) -> list[Any]:
    """A live SSE reader as a client library is: on a broken connection it reconnects, to the
    next server, from the last offset it was given; it ends at the stream's close."""
    messages: list[Any] = []
    offset, turn = "-1", 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=15)) as client:
        while time.monotonic() < deadline:
            base = bases[turn % len(bases)]
            try:
                async with client.stream("GET", base + path, params={"offset": offset, "live": "sse"}) as response:
                    if response.status_code != 200:
                        raise httpx.TransportError(f"status {response.status_code}")
                    pending: list[Any] = []
                    async for event, data in sse_events(response):
                        if event == "data":
                            pending = json.loads(data)
                        elif event == "control":
                            control = json.loads(data)
                            messages.extend(pending)  # data counts once its control event came
                            pending = []
                            offset = control["streamNextOffset"]
                            if control.get("streamClosed"):
                                return messages
            except (httpx.TransportError, httpx.StreamError):
                turn += 1
                await asyncio.sleep(0.1)  # a reconnect's backoff
    raise AssertionError(f"the reader did not reach the end: {len(messages)} messages")


class Acks(set[tuple[int, int]]):
    """Acknowledged writes, with a wait for the first ``count`` of them."""

    def __init__(self) -> None:
        super().__init__()
        self._waits: list[tuple[int, asyncio.Event]] = []

    def add(self, item: tuple[int, int]) -> None:
        super().add(item)
        for count, event in self._waits:
            if len(self) >= count:
                event.set()

    async def reached(self, count: int) -> None:
        event = asyncio.Event()
        self._waits.append((count, event))
        if len(self) >= count:
            event.set()
        await asyncio.wait_for(event.wait(), 30)


def check_exactly_once(found: list[Any], acknowledged: set[tuple[int, int]], attempted: set[tuple[int, int]]) -> None:
    counts = Counter((m["w"], m["n"]) for m in found if "w" in m)
    assert all(counts[key] == 1 for key in acknowledged), [k for k in acknowledged if counts[k] != 1][:5]
    assert all(count == 1 for count in counts.values()), [k for k, c in counts.items() if c > 1][:5]
    assert set(counts) <= attempted


async def write(bases: list[str], path: str, writer: int, count: int, acked: Acks, tried: set[Any]) -> None:
    """Plain appends (no producer headers), alternating between servers; a failed one is not
    retried (only a producer may retry safely), so it is there at most once."""
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(count):
            tried.add((writer, n))
            try:
                r = await client.post(bases[n % len(bases)] + path, headers=JSON_CT, json={"w": writer, "n": n})
                if r.status_code == 204:
                    acked.add((writer, n))
                else:
                    assert r.status_code == 503, r.text  # Redis down: said so, nothing else
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.005)


async def test_redis_sigkilled_and_restarted_under_writers_and_readers(servers: Servers, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=True)
    redis.start()
    try:
        prefix = unique_prefix()
        a, _ = servers.serve(redis.url, prefix)
        b, _ = servers.serve(redis.url, prefix)
        async with httpx.AsyncClient() as client:
            assert (await client.put(a + "/f", headers=JSON_CT)).status_code == 201
        deadline = time.monotonic() + 90
        readers = [asyncio.ensure_future(follow([a, b] if i % 2 else [b, a], "/f", deadline)) for i in range(4)]
        acked = Acks()
        tried: set[tuple[int, int]] = set()
        writers = [asyncio.ensure_future(write([a, b], "/f", w, 150, acked, tried)) for w in range(4)]
        await acked.reached(100)  # under way
        redis.kill()
        await asyncio.sleep(1)  # the outage
        redis.start()
        await asyncio.gather(*writers)
        async with httpx.AsyncClient() as client:
            end = await client.post(b + "/f", headers={**JSON_CT, "Stream-Closed": "true"}, json={"end": True})
            assert end.status_code == 204
        stored = await read_all(a, "/f")
        print(f"Redis restart: {len(acked)} of {len(tried)} appends acknowledged, {len(stored) - 1} stored")
        check_exactly_once(stored, acked, tried)
        assert len(acked) > 300  # most writes went through; the rest met the outage
        for reader in readers:
            assert await reader == stored  # each reader: every message once, in order
    finally:
        redis.stop()


async def test_a_worker_sigkilled_under_sse_readers_who_resume_through_the_other(
    servers: Servers, redis_url: str
) -> None:
    prefix = unique_prefix()
    a, victim = servers.serve(redis_url, prefix)
    b, _ = servers.serve(redis_url, prefix)
    async with httpx.AsyncClient() as client:
        assert (await client.put(b + "/k", headers=JSON_CT)).status_code == 201
    deadline = time.monotonic() + 60
    readers = [asyncio.ensure_future(follow([a, b], "/k", deadline)) for _ in range(20)]
    acked = Acks()
    tried: set[tuple[int, int]] = set()
    writer = asyncio.ensure_future(write([b], "/k", 0, 300, acked, tried))
    await acked.reached(100)
    victim.send_signal(signal.SIGKILL)  # its readers' connections break mid-stream
    await writer
    async with httpx.AsyncClient() as client:
        assert (await client.post(b + "/k", headers={**JSON_CT, "Stream-Closed": "true"})).status_code == 204
    stored = await read_all(b, "/k")
    assert len(acked) == len(tried) == 300 and len(stored) == 300
    for reader in readers:
        assert await reader == stored


async def test_redis_paused_under_writers_and_long_poll_readers(servers: Servers, redis_url: str) -> None:
    """CLIENT PAUSE (what a failover or a slow save looks like): requests wait, none is lost or
    doubled, and readers waiting across the pause get what was written."""
    prefix = unique_prefix()
    a, _ = servers.serve(redis_url, prefix)
    b, _ = servers.serve(redis_url, prefix)
    admin = Redis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.put(a + "/p", headers=JSON_CT)).status_code == 201
            tail = (await client.head(a + "/p")).headers["stream-next-offset"]
            waiting = asyncio.ensure_future(client.get(b + "/p", params={"offset": tail, "live": "long-poll"}))
            acked = Acks()
            tried: set[tuple[int, int]] = set()
            writers = [asyncio.ensure_future(write([a, b], "/p", w, 60, acked, tried)) for w in range(3)]
            await acked.reached(20)
            await admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            await asyncio.gather(*writers)
            woken = await waiting
            assert woken.status_code == 200 and woken.json()
        stored = await read_all(a, "/p")
        check_exactly_once(stored, acked, tried)
        assert len(acked) == len(tried) == 180, "a paused Redis is waited for, not failed"
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()


async def test_pubsub_connections_killed_under_waiting_long_poll_readers(servers: Servers, redis_url: str) -> None:
    """Every pub/sub connection is killed while readers wait on one process; a write through the
    other must still reach each of them as data (a lost wake-up would be a 204 at the timeout)."""
    prefix = unique_prefix()
    a, _ = servers.serve(redis_url, prefix)
    b, _ = servers.serve(redis_url, prefix)
    admin = Redis.from_url(redis_url)
    channel = f"{prefix}{{/w}}:n"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.put(a + "/w", headers=JSON_CT)).status_code == 201
            tail = (await client.head(a + "/w")).headers["stream-next-offset"]
            for round_ in range(3):
                waiting = [
                    asyncio.ensure_future(client.get(b + "/w", params={"offset": tail, "live": "long-poll"}))
                    for _ in range(10)
                ]
                for _ in range(200):  # the readers are subscribed (confirmed by Redis itself)
                    if (await admin.pubsub_numsub(channel))[0][1] >= 1:
                        break
                    await asyncio.sleep(0.01)
                assert await admin.client_kill_filter(_type="pubsub") >= 1
                appended = await client.post(a + "/w", headers=JSON_CT, json={"round": round_})
                assert appended.status_code == 204
                answers = await asyncio.gather(*waiting)
                assert [r.status_code for r in answers] == [200] * 10, [r.status_code for r in answers]
                assert all(r.json() == [{"round": round_}] for r in answers)
                tail = appended.headers["stream-next-offset"]
    finally:
        await admin.aclose()
