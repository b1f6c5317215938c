"""Script calls of one process share round trips (storage/redis_batch.py), against a real Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from durable_streams_asgi.storage.base import AppendRequest, Producer, StorageUnavailable, StreamConfig
from durable_streams_asgi.storage.redis import RedisStorage
from durable_streams_asgi.storage.redis_batch import ScriptBatcher

from .conftest import unique_prefix

TEXT = "text/plain"


async def clients_named(admin: Redis, name: str) -> list[dict[str, str]]:
    return [client for client in await admin.client_list() if client.get("name") == name]


async def test_concurrent_calls_share_one_connection_and_keep_their_order(redis_url: str) -> None:
    name = f"batch-{unique_prefix()}"
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name=name)
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        await storage.create("/o", StreamConfig(content_type=TEXT))
        # A producer's sequence numbers must arrive in order, or Redis answers with a gap: sent
        # on separate pooled connections they could overtake each other.
        results = await asyncio.gather(
            *(
                storage.append(
                    "/o", AppendRequest(content_type=TEXT, items=[f"{i},".encode()], producer=Producer("p", 0, i))
                )
                for i in range(50)
            )
        )
        assert [r.producer_seq for r in results] == list(range(50))
        expected = "".join(f"{i}," for i in range(50)).encode()
        assert b"".join((await storage.read("/o", 0, 10_000)).items) == expected
        # Fifty concurrent appends went over the one connection the first call opened.
        assert len(await clients_named(admin, name)) == 1
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_concurrent_calls_survive_a_script_flush(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    admin = Redis.from_url(redis_url)
    try:
        for i in range(10):
            await storage.create(f"/f{i}", StreamConfig(content_type=TEXT))
        await admin.script_flush()
        await asyncio.gather(
            *(storage.append(f"/f{i}", AppendRequest(content_type=TEXT, items=[b"x"])) for i in range(10))
        )
        for i in range(10):
            assert b"".join((await storage.read(f"/f{i}", 0, 100)).items) == b"x"
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_a_batch_cut_off_is_resent_only_where_that_cannot_write_twice(redis_url: str) -> None:
    """The connection dies with a batch sent and unanswered. A lone call per stream is sent again
    (its nonce would catch a second run); two calls for one stream are not, since the second's
    run would hide the first's: they fail with 503 rather than risk a duplicate."""
    name = f"cut-{unique_prefix()}"
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name=name)
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        for path in ("/a", "/b"):
            await storage.create(path, StreamConfig(content_type=TEXT))
        # Scripts may write, so a write pause holds the batch inside Redis, unrun.
        await admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            calls = asyncio.gather(
                storage.append("/a", AppendRequest(content_type=TEXT, items=[b"a"])),
                # In the same batch (storage.read would start a task, and a batch of its own). A
                # read changes nothing, so it never stands in the way of resending /a's append.
                storage._call("read", "/a", "0", "100", "1"),
                storage.append("/b", AppendRequest(content_type=TEXT, items=[b"b1"])),
                storage.append("/b", AppendRequest(content_type=TEXT, items=[b"b2"])),
                return_exceptions=True,
            )
            deadline = time.monotonic() + 10
            while not (blocked := [c for c in await clients_named(admin, name) if "b" in c["flags"]]):
                assert time.monotonic() < deadline, "the batch never reached Redis"
                await asyncio.sleep(0.01)
            await admin.client_kill_filter(_id=blocked[0]["id"])
            # The retry of /a is held by the pause too; wait for it to be there before lifting it.
            deadline = time.monotonic() + 10
            while not [c for c in await clients_named(admin, name) if "b" in c["flags"]]:
                assert time.monotonic() < deadline, "the lone call was not sent again"
                await asyncio.sleep(0.01)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        a, read, b1, b2 = await calls
        assert not isinstance(a, BaseException) and a.info.tail == 1
        assert not isinstance(read, BaseException) and read[0] == b"ok"
        assert isinstance(b1, StorageUnavailable) and isinstance(b2, StorageUnavailable)
        assert b"".join((await storage.read("/a", 0, 100)).items) == b"a"
        assert (await storage.read("/b", 0, 100)).items == []
    finally:
        await admin.aclose()
        await storage.aclose()


@pytest.mark.parametrize("count", [1, 1000])
async def test_a_large_tick_goes_out_as_one_ordered_batch(redis_url: str, count: int) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    try:
        await storage.create("/m", StreamConfig(content_type=TEXT))
        # Sequence numbers of one producer: any reordering would be refused as a gap.
        await asyncio.gather(
            *(
                storage.append("/m", AppendRequest(content_type=TEXT, items=[b"."], producer=Producer("p", 0, i)))
                for i in range(count)
            )
        )
        assert (await storage.head("/m")).tail == count
    finally:
        await storage.aclose()


async def test_a_batch_that_gets_no_reply_in_time_fails_and_leaves_no_connection_behind(redis_url: str) -> None:
    name = f"slow-{unique_prefix()}"
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name=name, socket_timeout=0.3)
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        await storage.create("/t", StreamConfig(content_type=TEXT))
        await admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            with pytest.raises(StorageUnavailable):
                await storage.append("/t", AppendRequest(content_type=TEXT, items=[b"late"]))
            # Connections with replies still owed were closed, not pooled for the next caller
            # (Redis notices a closed socket on its own time: wait for it, within bounds).
            deadline = time.monotonic() + 5
            while [c for c in await clients_named(admin, name) if "b" in c["flags"]]:
                assert time.monotonic() < deadline, "a connection with unread replies was kept"
                await asyncio.sleep(0.01)
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        await storage.append("/t", AppendRequest(content_type=TEXT, items=[b"next"]))
        assert b"".join((await storage.read("/t", 0, 100)).items) == b"next"
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_a_caller_that_left_still_counts_against_resending_its_streams_other_write(redis_url: str) -> None:
    """Redis may have run both appends of a cut-off batch; that one caller gave up on its reply
    changes nothing about that, so the other is not resent (it could be written twice)."""
    name = f"left-{unique_prefix()}"
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name=name)
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        await storage.create("/s", StreamConfig(content_type=TEXT))
        await admin.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            keep = asyncio.ensure_future(storage.append("/s", AppendRequest(content_type=TEXT, items=[b"K"])))
            gone = asyncio.ensure_future(storage.append("/s", AppendRequest(content_type=TEXT, items=[b"G"])))
            deadline = time.monotonic() + 10
            while not (blocked := [c for c in await clients_named(admin, name) if "b" in c["flags"]]):
                assert time.monotonic() < deadline, "the batch never reached Redis"
                await asyncio.sleep(0.01)
            gone.cancel()  # its client went away while the batch was out
            await admin.client_kill_filter(_id=blocked[0]["id"])
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        # (Resent, it would now succeed at once: Redis is writable again.)
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(keep, 5)
        assert (await storage.head("/s")).tail == 0
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_an_argument_that_cannot_be_encoded_fails_only_its_own_call(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    try:
        await storage.create("/ok", StreamConfig(content_type=TEXT))
        bad, ok = await asyncio.gather(
            storage.create("/bad\udcff", StreamConfig(content_type=TEXT)),
            storage.append("/ok", AppendRequest(content_type=TEXT, items=[b"fine"])),
            return_exceptions=True,
        )
        assert isinstance(bad, UnicodeEncodeError)
        assert not isinstance(ok, BaseException) and ok.info.tail == 4
    finally:
        await storage.aclose()


async def test_calls_queued_as_the_storage_closes_are_still_sent(redis_url: str) -> None:
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    admin = Redis.from_url(redis_url)
    try:
        await storage.create("/q", StreamConfig(content_type=TEXT))
        append = asyncio.ensure_future(storage.append("/q", AppendRequest(content_type=TEXT, items=[b"last"])))
        await asyncio.sleep(0)  # the append is queued for the end of this tick...
        await storage._router.aclose()  # ...and the batchers close in the same tick: it sends it
        assert append.done() and append.result().info.tail == 4
        await storage.aclose()
        assert await admin.hget(storage._keys("/q")[0], "tail") == b"4"
    finally:
        await admin.aclose()


async def test_a_connection_lost_while_reloading_scripts_leaves_no_caller_waiting(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis forgot the scripts (a restart, a promoted replica: the script cache is not
    replicated), so the call is answered NOSCRIPT and the batcher sends SCRIPT LOAD; the
    connection dies before that reply (fault: the reply lost). The call did not run, so it is sent
    again, and its caller gets an answer instead of waiting forever."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = ScriptBatcher._exchange
    armed = {"on": True}

    async def exchange(self: ScriptBatcher, connection: Any, batch: list[Any], deadline: float | None) -> Any:
        if not armed["on"]:
            return await original(self, connection, batch, deadline)
        send = connection.send_command

        async def send_command(*args: Any, **kwargs: Any) -> Any:
            await send(*args, **kwargs)
            if args[:2] == ("SCRIPT", "LOAD"):
                armed["on"] = False

                async def lost(*_: Any, **__: Any) -> Any:
                    del connection.read_response
                    raise RedisConnectionError("connection lost before the SCRIPT LOAD reply")

                connection.read_response = lost

        connection.send_command = send_command
        try:
            return await original(self, connection, batch, deadline)
        finally:
            del connection.send_command

    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    admin = Redis.from_url(redis_url)
    try:
        await admin.script_flush()
        monkeypatch.setattr(ScriptBatcher, "_exchange", exchange)
        created = await asyncio.wait_for(storage.create("/reload", StreamConfig(content_type=TEXT), [b"x"]), 10)
        assert created.created and not armed["on"]  # the fault happened, and the call still ran once
        assert (await storage.read("/reload", 0, 10)).items == [b"x"]
    finally:
        await admin.aclose()
        await storage.aclose()


async def test_batches_keep_one_connection_and_replace_it_when_redis_closed_it(redis_url: str) -> None:
    """Consecutive batches reuse the last one's connection instead of the pool's (cheaper than a
    small batch's calls); one that Redis closed while it sat idle is replaced before use, and
    the append that finds it so is applied once, without an error."""
    name = f"keep-{unique_prefix()}"
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix(), client_name=name)
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        await storage.create("/k", StreamConfig(content_type=TEXT))
        for i in range(20):  # one batch each, one after another
            await storage.append("/k", AppendRequest(content_type=TEXT, items=[b"%d," % i]))
        [kept] = await clients_named(admin, name)
        assert int(kept["id"]) > 0
        await admin.client_kill_filter(_id=kept["id"])
        await storage.append("/k", AppendRequest(content_type=TEXT, items=[b"after,"]))
        data = b"".join((await storage.read("/k", 0, 10_000)).items)
        assert data == b"".join(b"%d," % i for i in range(20)) + b"after,"
        [fresh] = await clients_named(admin, name)
        assert fresh["id"] != kept["id"]
    finally:
        await admin.aclose()
        await storage.aclose()
    async with Redis.from_url(redis_url, decode_responses=True) as check:
        assert await clients_named(check, name) == []  # closing the storage let its connection go


def test_script_calls_are_encoded_as_redis_py_encodes_them() -> None:
    """The batcher's own RESP packing (with the script's hash and the stream's keys packed once and
    remembered) gives the bytes redis-py's packer gives, for every argument type scripts take,
    small and large, and the same call packed again from the cache is the same."""
    client = Redis()
    batcher = ScriptBatcher(client)
    reference = client.connection_pool.connection_class()
    sha = "a" * 40
    keys = ["ds:{/s}:m", "ds:{/s}:d", "ds:{/s}:p", "ds:{/s}:f"]
    args: tuple[Any, ...] = ("text/plain", "0", "", "é", 7, b"\x00\r\n", b"x" * 5000, "y" * 2000, 0)
    expected = b"".join(reference.pack_command("EVALSHA", sha, len(keys), *keys, *args))
    for _ in range(2):
        assert b"".join(batcher._pack_call(sha, keys, args)) == expected
    other = ["ds:{/t}:m"]
    assert b"".join(batcher._pack_call(sha, other, ("1",))) == b"".join(
        reference.pack_command("EVALSHA", sha, 1, *other, "1")
    )
    with pytest.raises(TypeError):
        batcher._pack_call(sha, keys, (1.5,))


def test_what_the_name_caches_keep_is_bounded_per_entry() -> None:
    """A stream's keys and channel, and a call's packed start, are remembered for ordinary paths;
    a client asking for long paths (each escaped brace triples) gets them built each time, not
    kept: thousands of such paths could otherwise pin tens of megabytes."""
    storage = RedisStorage.from_url("redis://127.0.0.1:1/0", key_prefix="t:")  # (never connects)
    batcher = ScriptBatcher(Redis())
    short, long = "/chat/1", "/" + "{" * 1000
    for path in (short, long):
        keys = storage._keys(path)
        assert storage._keys(path) == keys and storage._channel(path).endswith(b":n")
        batcher._pack_call("a" * 40, keys, ("x",))
    assert list(storage._path_names) == [short]
    assert [key for _, key in batcher._prefixes] == [tuple(storage._keys(short))]
