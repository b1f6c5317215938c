"""Redis-only behaviour: several processes, pub/sub failures, Redis outages, the key layout."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from durable_streams_asgi import notifier
from durable_streams_asgi.storage.base import AppendRequest, StorageUnavailable, StreamConfig, StreamNotFound
from durable_streams_asgi.storage.redis import RedisStorage, StreamDataMissing

from .conftest import free_port, make_host_app, redis_server, running_server, spawn, sse_events, stop, unique_prefix

TEXT = {"Content-Type": "text/plain"}


def start_server(redis_url: str, prefix: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        "durable_streams_asgi.cli",
        "serve",
        "--port",
        str(port),
        "--storage",
        redis_url,
        "--key-prefix",
        prefix,
        "--long-poll-timeout",
        "10",
        "--log-level",
        "warning",
    ]
    return spawn(args, log, f"{url}/healthz"), url


@pytest.fixture
def two_servers(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two server processes on different ports sharing one Redis (and one key prefix)."""
    prefix = unique_prefix()
    a, url_a = start_server(redis_url, prefix, tmp_path / "a.log")
    b, url_b = start_server(redis_url, prefix, tmp_path / "b.log")
    try:
        yield f"{url_a}/v1/stream", f"{url_b}/v1/stream"
    finally:
        for process in (a, b):
            stop(process)
    for name in ("a.log", "b.log"):
        assert "Traceback" not in (tmp_path / name).read_text()


@pytest.mark.parametrize(
    ("content_type", "chunks", "expected"),
    [
        ("text/plain", [b"hello", b" world"], b" world"),
        ("application/json", [b'{"n":1}', b"[2,3]"], b"[2,3]"),
        ("application/octet-stream", [bytes(range(256)), b"\x00\xff"], b"\x00\xff"),
    ],
)
async def test_long_poll_on_one_process_wakes_on_append_through_another(
    two_servers: tuple[str, str], content_type: str, chunks: list[bytes], expected: bytes
) -> None:
    a, b = two_servers
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.put(f"{a}/x", headers={"Content-Type": content_type}, content=chunks[0])
        tail = r.headers["stream-next-offset"]
        poll = asyncio.create_task(client.get(f"{b}/x", params={"offset": tail, "live": "long-poll"}))
        await asyncio.sleep(0.2)  # let the poll reach its wait; correctness does not depend on it
        started = time.monotonic()
        await client.post(f"{a}/x", headers={"Content-Type": content_type}, content=chunks[1])
        r = await asyncio.wait_for(poll, 15)
        assert time.monotonic() - started < 5  # woken by pub/sub, not by the 10 s timeout
    assert r.status_code == 200
    if content_type == "application/json":
        assert json.loads(r.content) == [2, 3]
    else:
        assert r.content == expected


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
async def test_sse_on_one_process_follows_writes_and_close_through_another(
    two_servers: tuple[str, str], content_type: str
) -> None:
    a, b = two_servers
    payloads = [b'{"i":1}', b'{"i":2}'] if content_type == "application/json" else [b"\x01\x02", b"\xfe\xff"]
    received: list[bytes] = []
    async with httpx.AsyncClient(timeout=20) as client:
        await client.put(f"{a}/s", headers={"Content-Type": content_type})
        async with client.stream("GET", f"{b}/s", params={"offset": "-1", "live": "sse"}) as response:
            controls = 0
            async for event, data in sse_events(response):
                if event == "control":
                    controls += 1
                    if controls <= len(payloads):
                        close = {"Stream-Closed": "true"} if controls == len(payloads) else {}
                        await client.post(
                            f"{a}/s", headers={"Content-Type": content_type, **close}, content=payloads[controls - 1]
                        )
                    else:
                        assert json.loads(data)["streamClosed"] is True
                elif content_type == "application/json":
                    received.extend(json.dumps(m, separators=(",", ":")).encode() for m in json.loads(data))
                else:
                    received.append(base64.b64decode(data.replace("\n", "")))
    assert received == payloads


async def test_producer_requests_racing_across_processes_apply_once(two_servers: tuple[str, str]) -> None:
    a, b = two_servers
    headers = {**TEXT, "Producer-Id": "p", "Producer-Epoch": "0"}
    async with httpx.AsyncClient(timeout=20) as client:
        await client.put(f"{a}/p", headers=TEXT)
        await client.post(f"{a}/p", headers={**headers, "Producer-Seq": "0"}, content=b"0")
        results = await asyncio.gather(
            *(
                client.post(f"{a if i % 2 else b}/p", headers={**headers, "Producer-Seq": "1"}, content=b"1")
                for i in range(20)
            )
        )
        assert sorted(r.status_code for r in results) == [200] + [204] * 19
        assert (await client.get(f"{b}/p")).content == b"01"


async def wait_subscribed(admin: Redis, storage: RedisStorage, path: str) -> None:
    """Until the reader's subscription for ``path`` exists on the server (the event to kill it)."""
    channel = storage._channel(path)
    deadline = time.monotonic() + 10
    while (await admin.pubsub_numsub(channel))[0][1] < 1:
        assert time.monotonic() < deadline, "reader never subscribed"
        await asyncio.sleep(0.02)


async def test_waiters_still_wake_after_the_pubsub_connection_is_killed(redis_url: str) -> None:
    prefix = unique_prefix()
    reader = RedisStorage.from_url(redis_url, key_prefix=prefix)
    writer = RedisStorage.from_url(redis_url, key_prefix=prefix)
    admin = Redis.from_url(redis_url)
    try:
        await writer.create("/k", StreamConfig(content_type="text/plain"))
        app = make_host_app(reader, long_poll_timeout=30, sse_max_duration=60)
        async with running_server(app) as url, httpx.AsyncClient(base_url=f"{url}/v1/stream", timeout=30) as c:
            async with c.stream("GET", "/k", params={"offset": "-1", "live": "sse"}) as response:
                events = sse_events(response)
                for round_ in range(3):
                    event, _ = await asyncio.wait_for(anext(events), 10)
                    assert event == "control"  # caught up: the reader now waits on pub/sub
                    killed = 0
                    for _ in range(50):  # the notifier may be between connections: kill a live one
                        await wait_subscribed(admin, reader, "/k")
                        killed = await admin.client_kill_filter(_type="pubsub")
                        if killed:
                            break
                    assert killed >= 1
                    started = time.monotonic()
                    await writer.append("/k", AppendRequest(content_type="text/plain", items=[f"m{round_}".encode()]))
                    event, data = await asyncio.wait_for(anext(events), 10)
                    assert (event, data) == ("data", f"m{round_}")
                    # Far sooner than the 15 s keep-alive that would otherwise re-check.
                    assert time.monotonic() - started < 5
    finally:
        await admin.aclose()
        await reader.aclose()
        await writer.aclose()


async def _subscribe_calls(admin: Redis) -> int:
    return int((await admin.info("commandstats")).get("cmdstat_subscribe", {}).get("calls", 0))


async def test_a_channel_outlives_its_last_waiter_briefly_then_is_unsubscribed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live reader leaves its wait for every message and comes straight back: the channel stays
    subscribed across that gap (no SUBSCRIBE per message), and goes once nobody comes back."""
    monkeypatch.setattr(notifier, "_LINGER", 1.0)
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    admin = Redis.from_url(redis_url)
    try:
        await storage.create("/l", StreamConfig(content_type="text/plain"))
        channel = storage._channel("/l")
        assert not await storage.wait_for_data("/l", 0, 0.01)
        subscribes = await _subscribe_calls(admin)
        for _ in range(5):
            assert not await storage.wait_for_data("/l", 0, 0.01)
        assert await _subscribe_calls(admin) == subscribes
        assert (await admin.pubsub_numsub(channel))[0][1] == 1
        # Still woken by what is written while it lingers and after it comes back.
        waiting = asyncio.ensure_future(storage.wait_for_data("/l", 0, 10))
        await storage.append("/l", AppendRequest(content_type="text/plain", items=[b"x"]))
        assert await waiting
        deadline = time.monotonic() + 10
        while (await admin.pubsub_numsub(channel))[0][1] > 0:
            assert time.monotonic() < deadline, "the channel was never let go"
            await asyncio.sleep(0.05)
    finally:
        await admin.aclose()
        await storage.aclose()


@pytest.fixture
async def outage_redis(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A Redis of this test's own, which the test may stop and restart."""
    (tmp_path / "r1").mkdir()
    with redis_server(tmp_path / "r1") as url:
        yield url, tmp_path


async def test_redis_outage_gives_503_and_recovers(outage_redis: tuple[str, Path]) -> None:
    url, tmp_path = outage_redis
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    storage = RedisStorage.from_url(url, key_prefix=unique_prefix())
    app = make_host_app(storage, long_poll_timeout=2)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t/v1/stream") as c:
            assert (await c.put("/o", headers=TEXT, content=b"before")).status_code == 201
            # Stop Redis (SHUTDOWN NOSAVE: it keeps nothing, like a crash of a cache node).
            admin = Redis.from_url(url)
            with contextlib.suppress(Exception):  # the connection may drop as it shuts down
                await admin.shutdown(nosave=True)
            await admin.aclose()
            for method, path, kwargs in (
                ("POST", "/o", {"headers": TEXT, "content": b"x"}),
                ("GET", "/o", {}),
                ("HEAD", "/o", {}),
                ("PUT", "/new", {"headers": TEXT}),
                ("GET", "/o?offset=now&live=long-poll", {}),
            ):
                started = time.monotonic()
                r = await c.request(method, path, **kwargs)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                assert r.headers["retry-after"] == "1"
                assert time.monotonic() - started < 8  # fails fast, does not hang
            with pytest.raises(StorageUnavailable):
                await storage.head("/o")
            # Redis returns (empty: it kept nothing): the same storage object recovers by itself.
            process = await asyncio.create_subprocess_exec(
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp_path),
                "--save",
                "",
                "--appendonly",
                "no",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 10
                while True:
                    r = await c.put("/after", headers=TEXT, content=b"ok")
                    if r.status_code == 201 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert r.status_code == 201
                assert (await c.get("/after")).content == b"ok"
            finally:
                process.terminate()
                await process.wait()
    finally:
        await storage.aclose()


async def test_keys_share_one_hash_tag_and_prefix(redis_url: str) -> None:
    prefix = unique_prefix()
    storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
    admin = Redis.from_url(redis_url)
    try:
        await storage.create("/a/{weird}%path", StreamConfig(content_type="text/plain", ttl_seconds=60), [b"x"])
        await storage.append("/a/{weird}%path", AppendRequest(content_type="text/plain", items=[b"y"]))
        keys = sorted(k.decode() for k in await admin.keys(f"{prefix}*"))
        tag = "{/a/%7Bweird%7D%25path}"
        assert keys == [f"{prefix}{tag}:d", f"{prefix}{tag}:m"]
        for key in keys:  # every key of a TTL stream expires with it
            assert 0 < await admin.pttl(key) <= 60_000
        assert len({key_slot(k.encode()) for k in keys}) == 1  # one Redis Cluster slot
    finally:
        await admin.aclose()
        await storage.aclose()


def test_key_prefix_must_not_contain_hash_tag_braces(redis_url: str) -> None:
    with pytest.raises(ValueError):
        RedisStorage.from_url(redis_url, key_prefix="bad{prefix}:")


async def test_scripts_are_reloaded_after_script_flush(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    admin = Redis.from_url(redis_url)
    try:
        await storage.create("/s", StreamConfig(content_type="text/plain"), [b"a"])
        await admin.script_flush()  # e.g. a failover to a replica that never saw the scripts
        await storage.append("/s", AppendRequest(content_type="text/plain", items=[b"b"]))
        assert b"".join((await storage.read("/s", 0, 100)).items) == b"ab"
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_large_appends_are_stored_in_bounded_entries_and_read_in_bounded_pieces(redis_url: str) -> None:
    prefix = unique_prefix()
    storage = RedisStorage(Redis.from_url(redis_url), key_prefix=prefix, entry_size=64 * 1024, owns_client=True)
    admin = Redis.from_url(redis_url)
    try:
        payload = bytes(range(256)) * (3 * 4096 + 7)  # just over 3 MiB
        await storage.create("/big", StreamConfig(content_type="application/octet-stream"), [payload[:1000]])
        await storage.append("/big", AppendRequest(content_type="application/octet-stream", items=[payload[1000:]]))
        entries = await admin.xrange(storage._keys("/big")[1])
        assert max(len(fields[b"d"]) for _, fields in entries) <= 64 * 1024
        assert len(entries) >= len(payload) // (64 * 1024)
        out, position, reads = b"", 0, 0
        while True:
            result = await storage.read("/big", position, 1024 * 1024)
            chunk = b"".join(result.items)
            assert len(chunk) <= 1024 * 1024 + 64 * 1024
            out += chunk
            position = result.next
            reads += 1
            if result.up_to_date:
                break
        assert out == payload and reads >= 3
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_lifespan_hook_closes_the_storage(redis_url: str) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from durable_streams_asgi import durable_streams_app, durable_streams_lifespan

    name = f"lifespan-{uuid.uuid4().hex[:8]}"
    # Every connection of this storage carries the name, so the server can list them.
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name=name)
    streams = durable_streams_app(storage, long_poll_timeout=0.5)
    host = Starlette(routes=[Mount("/v1/stream", app=streams)], lifespan=durable_streams_lifespan(streams))
    admin = Redis.from_url(redis_url)
    try:

        async def ours() -> list[dict[str, object]]:
            return [c for c in await admin.client_list() if c.get("name") == name]

        async with running_server(host, lifespan="on") as url:  # uvicorn runs the host's lifespan
            async with httpx.AsyncClient(base_url=f"{url}/v1/stream") as c:
                assert (await c.put("/l", headers=TEXT)).status_code == 201
                poll = await c.get("/l", params={"offset": "now", "live": "long-poll"})  # uses pub/sub too
                assert poll.status_code == 204
            assert len(await ours()) >= 2
        assert not await ours()  # closed on shutdown
    finally:
        await admin.aclose()


async def test_fork_races_across_processes_keep_reference_counts_exact(redis_url: str) -> None:
    """Forks created through one client while the source is deleted through another: every fork
    either fails cleanly or reads the source's data, and the source goes once the forks do."""
    prefix = unique_prefix()
    one = RedisStorage.from_url(redis_url, key_prefix=prefix)
    two = RedisStorage.from_url(redis_url, key_prefix=prefix)
    admin = Redis.from_url(redis_url)
    try:
        for round_ in range(15):
            src = f"/src{round_}"
            await one.create(src, StreamConfig(content_type="text/plain"), [b"data"])
            forks = [
                (one if i % 2 else two).create(f"{src}/f{i}", StreamConfig(content_type=None, fork_from=src))
                for i in range(6)
            ]
            results = await asyncio.gather(two.delete(src), *forks, return_exceptions=True)
            assert results[0] is None
            made = [f"{src}/f{i}" for i, r in enumerate(results[1:]) if not isinstance(r, BaseException)]
            for path in made:
                assert b"".join((await one.read(path, 0, 100)).items) == b"data"
            # Identical concurrent re-creates of one fork take (and keep) one reference.
            if made:
                again = await asyncio.gather(
                    *(s.create(made[0], StreamConfig(content_type=None, fork_from=src)) for s in (one, two, one, two))
                )
                assert not any(r.created for r in again)
            for path in made:
                await (one if len(path) % 2 else two).delete(path)
            assert await admin.exists(*one._keys(src)) == 0, "source left behind"
    finally:
        await admin.aclose()
        await one.aclose()
        await two.aclose()


async def test_an_append_sent_again_after_a_lost_reply_writes_once_whatever_came_between(redis_url: str) -> None:
    """A reply lost after the script ran makes the storage send it again, marked as such. Other
    writers may have appended in between ([A][B] then A again): the script finds A among the
    stream's recent appends and answers as the first run did. Once more appends came between
    than it remembers, it cannot tell, and the caller gets 503 instead of a second copy."""
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())

    def args(nonce: str, data: bytes) -> tuple[object, ...]:
        return ("text/plain", "0", "", "", "0", "0", storage._channel("/n"), nonce, data)

    try:
        await storage.create("/n", StreamConfig(content_type="text/plain"))
        first = await storage._call("append", "/n", *args("nonce-a", b"A"))
        await storage.append("/n", AppendRequest("text/plain", [b"B"]))  # another writer
        again = await storage._call("append", "/n", *args("!nonce-a", b"A"))
        assert first[0] == again[0] == b"ok" and first[1] == again[1] == b"1"  # A's own tail
        assert b"".join((await storage.read("/n", 0, 100)).items) == b"AB"
        # Sent again but never applied (the connection died before Redis read it): written now.
        assert (await storage._call("append", "/n", *args("!nonce-c", b"C")))[1] == b"3"
        # Too many appends came between: it cannot tell, so it writes nothing and says so.
        for _ in range(20):
            await storage.append("/n", AppendRequest("text/plain", [b"."]))
        assert (await storage._call("append", "/n", *args("!nonce-a", b"A"))) == [b"unsure"]
        assert b"".join((await storage.read("/n", 0, 100)).items) == b"ABC" + b"." * 20
    finally:
        await storage.aclose()


async def test_a_resent_append_is_recognised_through_fifteen_appends_between_and_not_sixteen(redis_url: str) -> None:
    """The script remembers the last 16 plain appends (a ring of meta fields): an append sent
    again after 15 others came between is still found, wherever the ring has turned to; after 16
    it is not, and the caller hears "unsure" instead of a second copy. Fields an earlier layout
    left ('rn', 'rc') change nothing."""
    prefix = unique_prefix()
    storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
    admin = Redis.from_url(redis_url)

    def args(nonce: str, data: bytes) -> tuple[object, ...]:
        return ("text/plain", "0", "", "", "0", "0", storage._channel("/r"), nonce, data)

    try:
        await storage.create("/r", StreamConfig(content_type="text/plain"))
        meta = storage._keys("/r")[0]
        # What an earlier version kept: a list that claims to be full and names none of ours.
        await admin.hset(meta, mapping={"rn": ";other:1", "rc": "16"})
        for turn in range(3):  # the ring at several starting points
            for _ in range(turn * 5):
                await storage.append("/r", AppendRequest("text/plain", [b"."]))
            first = await storage._call("append", "/r", *args(f"n-{turn}", b"A"))
            for _ in range(15):
                await storage.append("/r", AppendRequest("text/plain", [b"."]))
            tail = (await storage.head("/r")).tail
            again = await storage._call("append", "/r", *args(f"!n-{turn}", b"A"))
            assert again[:2] == first[:2]  # the first run's own tail
            assert (await storage.head("/r")).tail == tail  # nothing written again
            await storage.append("/r", AppendRequest("text/plain", [b"."]))
            assert await storage._call("append", "/r", *args(f"!n-{turn}", b"A")) == [b"unsure"]
            assert (await storage.head("/r")).tail == tail + 1
        assert await admin.hget(meta, "rn") == b";other:1"  # left for the version that reads it
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_killed_pooled_connections_are_replaced_transparently(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name="pooled-kill")
    admin = Redis.from_url(redis_url)
    try:
        await storage.create("/k", StreamConfig(content_type="text/plain"))
        for round_ in range(3):
            # A Redis restart or an idle timeout between requests looks like this to the pool.
            killed = 0
            for client in await admin.client_list():
                if client.get("name") == "pooled-kill":
                    killed += await admin.client_kill_filter(_id=client["id"])
            assert killed >= 1
            await storage.append("/k", AppendRequest(content_type="text/plain", items=[str(round_).encode()]))
        assert b"".join((await storage.read("/k", 0, 100)).items) == b"012"
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_forks_that_expire_by_redis_ttl_release_their_source(redis_url: str) -> None:
    prefix = unique_prefix()
    storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
    admin = Redis.from_url(redis_url)
    try:
        await storage.create("/src", StreamConfig(content_type="text/plain", ttl_seconds=1), [b"x"])
        await storage.create("/f", StreamConfig(content_type=None, fork_from="/src"))  # inherits TTL 1
        await storage.create("/g", StreamConfig(content_type=None, fork_from="/src", expires_at=time.time() - 1))
        await asyncio.sleep(1.2)
        assert await storage.sweep() == 2
        assert all(b"{__ds:forks:" in key for key in await admin.keys(f"{prefix}*"))  # the fork index, if anything
        assert (await storage.create("/src", StreamConfig(content_type="application/json"))).created
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_a_fork_whose_create_outcome_is_unknown_keeps_its_reference_until_proven_absent(
    redis_url: str,
) -> None:
    prefix = unique_prefix()
    storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
    try:
        await storage.create("/src", StreamConfig(content_type="text/plain"), [b"x"])
        await storage.create("/f", StreamConfig(content_type=None, fork_from="/src"))
        # Simulate a process that died between taking a reference and creating its fork, and one
        # of an earlier version, whose fork index was one set.
        await storage._call("fork_ref", "/src", "/ghost\nabc", "", "0", "")
        await storage._command("ZADD", storage._index("/ghost\nabc\n/src"), 0, "/ghost\nabc\n/src")
        await storage._call("fork_ref", "/src", "/old\ndef", "", "0", "")
        await storage._command("ZADD", f"{prefix}forks", 0, "/old\ndef\n/src")
        await storage.delete("/src")  # soft: three references
        assert await storage.sweep() == 2  # the ghosts' go; the real fork's stays
        assert b"".join((await storage.read("/f", 0, 10)).items) == b"x"
        await storage.delete("/f")
        with pytest.raises(StreamNotFound):
            await storage.head("/src")
    finally:
        await storage.aclose()


async def test_missing_data_is_an_error_not_an_empty_read(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    try:
        await storage.create("/m", StreamConfig(content_type="text/plain"), [b"abc"])
        await storage._command("DEL", storage._keys("/m")[1])  # as eviction would
        with pytest.raises(StreamDataMissing):
            await storage.read("/m", 0, 100)
    finally:
        await storage.aclose()


async def test_out_of_memory_is_503_not_500(tmp_path: Path) -> None:
    (tmp_path / "oom").mkdir()
    with redis_server(tmp_path / "oom") as url:
        admin = Redis.from_url(url)
        await admin.config_set("maxmemory", "2mb")
        await admin.config_set("maxmemory-policy", "noeviction")
        storage = RedisStorage.from_url(url, key_prefix=unique_prefix())
        transport = httpx.ASGITransport(app=make_host_app(storage))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t/v1/stream") as c:
                assert (await c.put("/o", headers=TEXT)).status_code == 201
                statuses = set()
                for _ in range(20):
                    r = await c.post("/o", headers=TEXT, content=b"x" * 200_000)
                    statuses.add(r.status_code)
                    if r.status_code == 503:
                        assert r.headers["retry-after"] == "1"
                        break
                assert 503 in statuses and 500 not in statuses
        finally:
            await admin.aclose()
            await storage.aclose()


async def test_a_call_begun_before_a_moment_never_answers_for_after_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watch() subscribes, takes a moment, then checks for data with a head; readers share heads
    already under way, but never one begun before their moment, which may predate a write that
    no notification reported. Moments are a counter: with a clock they tied (uvloop's
    loop.time() has a 1 ms resolution), and a head begun just before passed for a later one."""
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    loop = asyncio.get_running_loop()
    release = asyncio.Event()

    async def early() -> str:
        await release.wait()
        return "snapshot from before"

    async def fresh() -> str:
        return "snapshot from after"

    try:
        monkeypatch.setattr(loop, "time", lambda: 1000.0)  # every clock reading ties
        first = asyncio.ensure_future(storage._calls.run(("head", "/s"), early))
        await asyncio.sleep(0)  # under way
        moment = storage._calls.moment()
        second = asyncio.ensure_future(storage._calls.run(("head", "/s"), fresh, since=moment))
        for _ in range(20):  # a few loop turns: a fresh call is answered, a joined one waits on
            await asyncio.sleep(0)
        assert second.done(), "joined a call begun before its moment"
        assert second.result() == "snapshot from after"
        joined = asyncio.ensure_future(storage._calls.run(("head", "/s"), fresh))  # no moment: may join
        monkeypatch.undo()
        release.set()
        assert await first == "snapshot from before"
        assert await joined in ("snapshot from before", "snapshot from after")
        assert storage._calls.moment() > moment
    finally:
        monkeypatch.undo()
        await storage.aclose()


async def test_one_append_holds_redis_briefly_and_a_huge_array_is_refused(redis_url: str) -> None:
    """Each JSON message is one stream entry written by one atomic script, so the messages of
    one request bound how long it holds Redis for everyone. The largest request accepted (the
    max_messages limit of tiny messages, and a 16 MiB body of large ones) is measured with Redis's
    SLOWLOG; one message more is a 413, refused while parsing, with nothing written."""
    prefix = unique_prefix()
    storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
    admin = Redis.from_url(redis_url)
    app = make_host_app(storage)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1/stream") as c:
            json_ct = {"Content-Type": "application/json"}
            assert (await c.put("/big", headers=json_ct)).status_code == 201
            await admin.config_set("slowlog-log-slower-than", 0)
            await admin.slowlog_reset()
            most = b"[" + b",".join([b"1"] * 10_000) + b"]"
            assert (await c.post("/big", headers=json_ct, content=most)).status_code == 204
            large = b"[" + b",".join([b'"' + b"x" * 1_000_000 + b'"'] * 16) + b"]"  # just under 16 MiB
            assert (
                await c.post("/big", headers={"Content-Type": "application/json"}, content=large)
            ).status_code == 204
            slowest = max(entry["duration"] for entry in await admin.slowlog_get(128))
            await admin.config_set("slowlog-log-slower-than", 10_000)
            print(f"SLOWLOG: the largest accepted appends held Redis for at most {slowest / 1000:.1f} ms")
            assert slowest < 500_000, f"one append held Redis for {slowest} us"

            too_many = b"[" + b",".join([b"1"] * 10_001) + b"]"
            r = await c.post("/big", headers=json_ct, content=too_many)
            assert r.status_code == 413 and "more than 10000 JSON messages" in r.text
            assert (await storage.head("/big")).tail == 10_016
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_a_master_without_its_replicas_refuses_writes_with_503_and_writes_nothing(tmp_path: Path) -> None:
    """``min-replicas-to-write`` (the README's way to bound what a failover loses): a master that
    has no replica in sight refuses each script before its first write, and that is a 503."""
    with redis_server(tmp_path / "redis") as url:
        admin = Redis.from_url(url)
        storage = RedisStorage.from_url(url, key_prefix=unique_prefix())
        try:
            await admin.config_set("min-replicas-to-write", 1)
            with pytest.raises(StorageUnavailable, match="NOREPLICAS"):
                await storage.create("/r", StreamConfig(content_type="text/plain"), [b"x"])
            with pytest.raises(StreamNotFound):
                await storage.head("/r")  # reads go on
            await admin.config_set("min-replicas-to-write", 0)
            await storage.create("/r", StreamConfig(content_type="text/plain"), [b"x"])
            await admin.config_set("min-replicas-to-write", 1)
            with pytest.raises(StorageUnavailable, match="NOREPLICAS"):
                await storage.append("/r", AppendRequest("text/plain", [b"y"]))
            assert (await storage.read("/r", 0, 10)).items == [b"x"]
        finally:
            await storage.aclose()
            await admin.aclose()
