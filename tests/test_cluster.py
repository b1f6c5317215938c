"""Redis Cluster, with real servers (3 masters, 3 replicas, started by the fixtures): streams on
every shard, live readers in one "process" woken by writes through another, notifications that
stay within their shard, a slot migrated under live readers and writers, and a master SIGKILLed
under load (its replica promoted; what was acknowledged and lost is counted)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from durable_streams_asgi.settings import UsageError, make_storage
from durable_streams_asgi.storage.base import (
    AppendRequest,
    Producer,
    ProducerSeqGap,
    StorageUnavailable,
    StreamConfig,
)
from durable_streams_asgi.storage.redis import RedisStorage
from durable_streams_asgi.storage.redis_cluster import parse_cluster_url

from .conftest import eventually, unique_prefix
from .redis_cluster import LocalCluster, ask, local_cluster

TEXT = StreamConfig(content_type="text/plain")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster of this module's own: the tests move its slots."""
    with local_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


def slot(path: str) -> int:
    return key_slot(path.encode())  # a stream's keys are tagged with its (escaped) path


def paths_on_every_master(cluster: LocalCluster, per_master: int) -> list[str]:
    """Stream paths, ``per_master`` of them served by each master."""
    wanted = {port: per_master for port in cluster.masters()}
    paths: list[str] = []
    i = 0
    while any(wanted.values()):
        path = f"/spread/{i}"
        owner = cluster.master_of_slot(slot(path))
        if wanted.get(owner):
            wanted[owner] -= 1
            paths.append(path)
        i += 1
    return paths


def path_in_slot(target: int, stem: str) -> str:
    i = 0
    while slot(f"{stem}/{i}") != target:
        i += 1
    return f"{stem}/{i}"


def test_cluster_urls() -> None:
    seeds, template = parse_cluster_url("redis+cluster://u%40x:p%3Aw@a:7000,[::1]:7001")
    assert seeds == [("a", 7000), ("::1", 7001)]
    assert template.format(host="h", port=1) == "redis://u%40x:p%3Aw@h:1/0"
    assert parse_cluster_url("rediss+cluster://a:1")[1].startswith("rediss://")
    # An IPv6 node name goes back into its URL in brackets.
    from durable_streams_asgi.storage.redis_cluster import ClusterTopology

    topology = ClusterTopology([("::1", 7001)], template, {})
    assert topology.client("::1:7001").connection_pool.connection_kwargs["host"] == "::1"
    for bad in ("redis+cluster://a", "redis+cluster://a:x", "redis+cluster://a:1/3"):
        with pytest.raises(UsageError):
            make_storage(bad)


async def test_live_readers_on_every_shard_are_woken_by_another_process(cluster: LocalCluster) -> None:
    prefix = unique_prefix()
    reader, writer = (RedisStorage.from_url(cluster.url, key_prefix=prefix) for _ in range(2))
    try:
        paths = paths_on_every_master(cluster, 4)
        for path in paths:
            await writer.create(path, TEXT)
        rounds = 5
        positions: dict[int, int] = {}

        async def follow(path: str, me: int) -> bytes:
            data, position = b"", 0
            while position < rounds:
                positions[me] = position
                if not await reader.wait_for_data(path, position, 20):
                    pytest.fail(f"a live reader of {path} was not woken")
                result = await reader.read(path, position, 1 << 20)
                data += b"".join(result.items)
                position = result.next
            return data

        followers = [asyncio.ensure_future(follow(path, n * 3 + k)) for n, path in enumerate(paths) for k in range(3)]
        for i in range(rounds):
            # Each write once every reader has read the one before (and waits, or is about to).
            async def all_at(i: int = i) -> bool:
                return len(positions) == len(followers) and min(positions.values()) == i

            await eventually(all_at)
            await asyncio.gather(*(writer.append(path, AppendRequest("text/plain", [b"%d" % i])) for path in paths))
        for data in await asyncio.wait_for(asyncio.gather(*followers), 30):
            assert data == b"01234"
        # Each channel is subscribed on its own shard only: notifications stay within it.
        for port in cluster.masters():
            channels = ask(port, "PUBSUB", "SHARDCHANNELS", f"{prefix}*")
            mine = [path for path in paths if cluster.master_of_slot(slot(path)) == port]
            for path in paths:
                assert (f"{prefix}{{{path}}}:n".encode() in channels) == (path in mine), (port, path)
        assert await reader.ready() is None
    finally:
        await reader.aclose()
        await writer.aclose()


async def test_a_slot_migrated_under_live_readers_and_a_writer(cluster: LocalCluster) -> None:
    """The stream's slot moves to another master while readers wait and a producer writes; a new
    stream is created in the slot half-way through the move. Every reader gets every message, once,
    in order, and none is left waiting."""
    prefix = unique_prefix()
    reader, writer = (RedisStorage.from_url(cluster.url, key_prefix=prefix) for _ in range(2))
    try:
        path = "/moving"
        await writer.create(path, TEXT)
        source = cluster.master_of_slot(slot(path))
        target = next(port for port in cluster.masters() if port != source)
        total = 200
        written = asyncio.Event()

        async def write() -> None:
            for i in range(total):
                request = AppendRequest("text/plain", [b"%d," % i], producer=Producer("p", 0, i))
                for _ in range(100):
                    try:
                        await writer.append(path, request)
                        break
                    except StorageUnavailable:
                        await asyncio.sleep(0.05)
                else:
                    pytest.fail("appends did not resume")
                await asyncio.sleep(0.005)
            written.set()

        expected = b"".join(b"%d," % i for i in range(total))

        async def follow() -> bytes:
            data, position = b"", 0
            while len(data) < len(expected):
                if not await reader.wait_for_data(path, position, 20):
                    pytest.fail("a live reader was left waiting across the migration")
                result = await reader.read(path, position, 1 << 20)
                data += b"".join(result.items)
                position = result.next
            return data

        followers = [asyncio.ensure_future(follow()) for _ in range(5)]
        writing = asyncio.ensure_future(write())
        loop = asyncio.get_running_loop()
        halfway, resume = threading.Event(), threading.Event()
        newcomer = path_in_slot(slot(path), "/newcomer")
        created: list[asyncio.Future[object]] = []

        def between() -> None:  # in the migrating thread, once the first keys have moved
            halfway.set()
            resume.wait(10)

        migration = loop.run_in_executor(None, lambda: cluster.migrate_slot(slot(path), target, between=between))
        await asyncio.sleep(0.3)  # let the writer and readers work on the slot before it moves
        await loop.run_in_executor(None, halfway.wait, 10)
        # Mid-migration: the stream's keys are split between the two masters (TRYAGAIN), a new
        # stream's keys are on neither (ASK, then TRYAGAIN until the slot has moved).
        created.append(asyncio.ensure_future(writer.create(newcomer, TEXT, [b"hello"])))
        await asyncio.sleep(0.2)
        resume.set()
        await migration
        assert cluster.master_of_slot(slot(path)) == target
        await asyncio.wait_for(writing, 60)
        for data in await asyncio.wait_for(asyncio.gather(*followers), 30):
            assert data == expected
        assert (await asyncio.wait_for(created[0], 10)).created  # type: ignore[attr-defined]
        assert (await reader.read(newcomer, 0, 100)).items == [b"hello"]
        # A reader that subscribed before the move and waits now is woken on the new master.
        tail = (await reader.head(path)).tail
        waiting = asyncio.ensure_future(reader.wait_for_data(path, tail, 20))
        await asyncio.sleep(0.1)
        await writer.append(path, AppendRequest("text/plain", [b"after"]))
        assert await asyncio.wait_for(waiting, 20)
        assert written.is_set()
    finally:
        await reader.aclose()
        await writer.aclose()


async def test_a_master_killed_under_load_fails_over(tmp_path: Path) -> None:
    with local_cluster(tmp_path / "cluster") as cluster:
        await _kill_a_master_under_load(cluster)


async def _kill_a_master_under_load(cluster: LocalCluster) -> None:
    prefix = unique_prefix()
    reader, writer, bystander = (RedisStorage.from_url(cluster.url, key_prefix=prefix) for _ in range(3))
    tasks: list[asyncio.Future[None]] = []
    try:
        paths = paths_on_every_master(cluster, 2)
        # The master of slot 0: the one commands without a key (the clock) went to first.
        victim = cluster.master_of_slot(0)
        doomed = [path for path in paths if cluster.master_of_slot(slot(path)) == victim]
        for path in paths:
            await writer.create(path, TEXT)
        await bystander.head(next(path for path in paths if path not in doomed))
        acknowledged: dict[str, list[int]] = {path: [] for path in paths}
        unavailable: dict[str, int] = {path: 0 for path in paths}
        lost_by_gap: dict[str, int] = {path: 0 for path in paths}
        killed_at: list[float] = []
        resumed_at: dict[str, float] = {}
        stop, resumed = asyncio.Event(), asyncio.Event()

        async def write(path: str) -> None:
            seq = 0
            while not stop.is_set():
                request = AppendRequest("text/plain", [b"%d," % seq], producer=Producer("w", 0, seq))
                try:
                    await writer.append(path, request)
                except StorageUnavailable:
                    unavailable[path] += 1
                    await asyncio.sleep(0.05)
                    continue
                except ProducerSeqGap as exc:  # acknowledged appends that the failover lost
                    lost_by_gap[path] += seq - exc.expected
                    seq = exc.expected
                    continue
                acknowledged[path].append(seq)
                if killed_at and path not in resumed_at and unavailable[path]:
                    resumed_at[path] = time.monotonic()
                    if all(p in resumed_at for p in doomed):
                        resumed.set()
                seq += 1
                await asyncio.sleep(0.002)

        tails: dict[str, int] = {}

        async def follow(path: str) -> None:
            """A live reader, to the end: it must reach the final tail, whatever the failover did."""
            position = 0
            while path not in tails or position < tails[path]:
                try:
                    if await reader.wait_for_data(path, position, 5):
                        position = (await reader.read(path, position, 1 << 20)).next
                except StorageUnavailable:
                    await asyncio.sleep(0.05)

        writers = [asyncio.ensure_future(write(path)) for path in paths]
        followers = [asyncio.ensure_future(follow(path)) for path in paths]
        tasks.extend([*writers, *followers])
        await asyncio.sleep(1.0)
        # Under load, the replica trails by what is in flight: what it had not received when its
        # master died is what an acknowledged write can lose (counted below, not assumed away).
        cluster.kill(victim)
        killed_at.append(time.monotonic())
        problem = await reader.ready()  # a readiness probe names the master that is gone
        assert problem is not None and str(victim) in problem, problem
        await asyncio.to_thread(cluster.wait_healthy, 30)
        await asyncio.wait_for(resumed.wait(), 30)  # every stream of the killed master written again

        async def ready() -> bool:  # probes poll: the map follows within a second or so
            return await reader.ready() is None

        await eventually(ready, 5)
        # A process that only ever used the healthy shards still forks (which reads the clock, a
        # command without a key, that went to the dead master first) within a moment.
        healthy = next(path for path in paths if path not in doomed)

        async def forked() -> bool:
            try:
                await bystander.create("/fork-after", StreamConfig(content_type=None, fork_from=healthy))
            except StorageUnavailable:
                return False
            return True

        await eventually(forked, 5)
        await asyncio.sleep(1.0)  # some writes after the failover, on every stream
        stop.set()
        await asyncio.gather(*writers)
        for path in paths:
            tails[path] = (await writer.head(path)).tail
        await asyncio.wait_for(asyncio.gather(*followers), 30)
        window = max(resumed_at[path] for path in doomed) - killed_at[0]
        for path in paths:
            data = b"".join((await reader.read(path, 0, 1 << 24)).items).decode()
            values = [int(v) for v in data.split(",") if v]
            assert values == sorted(set(values)), f"{path}: duplicated or out of order"
            missing = sorted(set(acknowledged[path]) - set(values))
            # An acknowledged append that the failover lost shows as a producer gap on the next.
            assert len(missing) == lost_by_gap[path], (path, missing, lost_by_gap[path])
            if path not in doomed:
                assert unavailable[path] == 0, path  # the other shards never noticed
        print(
            f"cluster failover: writes to the killed master's streams resumed {window:.1f} s after the kill; "
            f"{sum(unavailable[p] for p in doomed)} appends answered unavailable meanwhile; "
            f"{sum(lost_by_gap.values())} of {sum(len(acknowledged[p]) for p in paths)} acknowledged appends lost"
        )
    finally:
        for task in tasks:  # a failed assertion leaves them running
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await reader.aclose()
        await writer.aclose()
        await bystander.aclose()


async def wait_resolved_or_fail(future: asyncio.Future[None], timeout: float) -> None:
    from durable_streams_asgi.storage.common import wait_resolved

    assert await wait_resolved(future, timeout), f"not woken within {timeout} s"


BUSY = (
    "local s = redis.call('TIME'); local t0 = s[1] * 1e6 + s[2]\n"
    "while true do local n = redis.call('TIME'); if n[1] * 1e6 + n[2] - t0 > tonumber(ARGV[1]) then break end end\n"
    "return 1"
)


async def test_mid_migration_appends_wake_readers_and_are_applied_once(cluster: LocalCluster) -> None:
    """All keys of a stream (with a producer and a fork, so every one exists) already on the
    slot's target, the slot not handed over yet: appends follow ASK to the target. The reader,
    subscribed on the source (which serves the slot's channels until the handover), is woken, and
    an append whose reply is slow (a busy target, past the socket timeout) is applied once."""
    prefix = unique_prefix()
    writer = RedisStorage.from_url(cluster.url, key_prefix=prefix, socket_timeout=0.5)
    reader = RedisStorage.from_url(cluster.url, key_prefix=prefix)
    try:
        path = "/asked"
        await writer.create(path, TEXT)
        await writer.append(path, AppendRequest("text/plain", [b"P,"], producer=Producer("p", 0, 0)))
        await writer.create("/asked-fork", StreamConfig(content_type=None, fork_from=path))
        s = slot(path)
        source = cluster.master_of_slot(s)
        target = next(port for port in cluster.masters() if port != source)
        keys = [f"{prefix}{{{path}}}:{k}" for k in "mdpf"]
        tail = (await reader.head(path)).tail
        watch = await reader.watch(path, tail)  # subscribed on the source, and checked: waiting
        assert not watch.future.done()
        assert ask(target, "CLUSTER", "SETSLOT", str(s), "IMPORTING", cluster.node_id(source)) in (True, b"OK")
        assert ask(source, "CLUSTER", "SETSLOT", str(s), "MIGRATING", cluster.node_id(target)) in (True, b"OK")
        assert ask(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys) in (True, b"OK")
        await writer.append(path, AppendRequest("text/plain", [b"A,"]))
        try:
            await wait_resolved_or_fail(watch.future, 3)  # woken before the handover
        finally:
            watch.close()
        busy = asyncio.get_running_loop().run_in_executor(None, lambda: ask(target, "EVAL", BUSY, "0", "800000"))
        await asyncio.sleep(0.05)  # (the busy script has started)
        await writer.append(path, AppendRequest("text/plain", [b"B,"]))
        await busy
        for port in cluster.masters():
            ask(port, "CLUSTER", "SETSLOT", str(s), "NODE", cluster.node_id(target))
        assert b"".join((await reader.read(path, 0, 1 << 20)).items) == b"P,A,B,"
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_lost_reply_then_a_moved_slot_applies_an_append_once(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis runs the append, the reply is lost with the connection, the slot moves meanwhile:
    the batcher's resend is answered MOVED, and the append sent on to the new master must still
    be recognised as already applied (fault: the reply read, then the connection failed)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from durable_streams_asgi.storage.redis_batch import ScriptBatcher

    prefix = unique_prefix()
    storage = RedisStorage.from_url(cluster.url, key_prefix=prefix)
    path = "/once"
    original = ScriptBatcher._exchange
    armed: dict[str, Any] = {"on": False}

    async def exchange(self: ScriptBatcher, connection: Any, batch: list[Any], deadline: float | None) -> Any:
        if not (armed["on"] and any(call.stream == path for call in batch)):
            return await original(self, connection, batch, deadline)
        armed["on"] = False
        read = connection.read_response

        async def lossy(*args: Any, **kwargs: Any) -> Any:
            await read(*args, **kwargs)  # Redis ran the append; its reply is lost on the way
            await asyncio.to_thread(armed["migrate"])
            raise RedisConnectionError("connection lost before the reply was read")

        connection.read_response = lossy
        try:
            return await original(self, connection, batch, deadline)
        finally:
            del connection.read_response

    monkeypatch.setattr(ScriptBatcher, "_exchange", exchange)
    try:
        await storage.create(path, TEXT)
        s = slot(path)
        source = cluster.master_of_slot(s)
        target = next(port for port in cluster.masters() if port != source)
        armed["migrate"] = lambda: cluster.migrate_slot(s, target)
        await storage.append(path, AppendRequest("text/plain", [b"warm,"]))
        armed["on"] = True
        await storage.append(path, AppendRequest("text/plain", [b"once,"]))
        assert cluster.master_of_slot(s) == target
        assert b"".join((await storage.read(path, 0, 1 << 20)).items) == b"warm,once,"
    finally:
        await storage.aclose()


async def test_a_subscription_refused_by_a_stale_map_disturbs_no_other_reader(cluster: LocalCluster) -> None:
    """A slot moved and this process has not heard yet: its SSUBSCRIBE for that slot's stream is
    refused with MOVED by the old master. The waiter goes on to the new master at once, and the
    other live readers on the old master are not woken for nothing."""
    prefix = unique_prefix()
    reader, writer = (RedisStorage.from_url(cluster.url, key_prefix=prefix) for _ in range(2))
    watches = []
    try:
        old = cluster.masters()[0]
        new = cluster.masters()[1]
        on_old = [p for p in (f"/idle/{i}" for i in range(400)) if cluster.master_of_slot(slot(p)) == old]
        moving, idle = on_old[0], [p for p in on_old[1:] if slot(p) != slot(on_old[0])][:10]
        for path in [moving, *idle]:
            await writer.create(path, TEXT)
        for path in idle:
            watches.append(await reader.watch(path, 0))  # subscribed on the old master, waiting
        assert not any(watch.future.done() for watch in watches)
        await asyncio.to_thread(cluster.migrate_slot, slot(moving), new)  # behind the reader's back
        started = time.monotonic()
        assert await reader.wait_for_data(moving, 0, 1.0) is False  # subscribed where it is now
        assert time.monotonic() - started < 3
        assert not any(watch.future.done() for watch in watches)
        await writer.append(moving, AppendRequest("text/plain", [b"x"]))
        assert await reader.wait_for_data(moving, 0, 5)
    finally:
        for watch in watches:
            watch.close()
        await reader.aclose()
        await writer.aclose()
