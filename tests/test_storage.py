"""The storage contract, run against every backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from durable_streams_asgi.storage import base as st
from durable_streams_asgi.storage.base import AppendRequest, Producer, Storage, StreamConfig

from .conftest import STORAGE_BACKENDS, StorageFactory


@pytest.fixture(params=STORAGE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Memory, one Redis, and a Redis Cluster."""
    return request.param


TEXT = StreamConfig(content_type="text/plain")
JSON = StreamConfig(content_type="application/json")


def append(data: bytes | list[bytes], **kw: object) -> AppendRequest:
    items = data if isinstance(data, list) else [data]
    return AppendRequest(content_type=str(kw.pop("content_type", "text/plain")), items=items, **kw)  # type: ignore[arg-type]


async def two_processes(factory: StorageFactory, backend: str) -> tuple[Storage, Storage]:
    """Two storages on the same streams, as two server processes have (memory lives in one)."""
    storage = await factory()
    return storage, (storage if backend == "memory" else await factory())


async def read_all(storage: Storage, path: str, start: int = 0, max_bytes: int = 1 << 20) -> bytes:
    out = b""
    while True:
        result = await storage.read(path, start, max_bytes)
        out += b"".join(result.items)
        if result.up_to_date:
            return out
        assert result.next > start
        start = result.next


async def test_create_is_idempotent_and_detects_conflicts(storage: Storage) -> None:
    first = await storage.create("/s", TEXT, [b"hi"])
    assert first.created and first.info.tail == 2 and not first.info.closed
    again = await storage.create("/s", StreamConfig(content_type="TEXT/PLAIN; charset=utf-8"), [b"ignored"])
    assert not again.created and again.info.tail == 2
    for other in (
        StreamConfig(content_type="application/json"),
        StreamConfig(content_type="text/plain", ttl_seconds=60),
        StreamConfig(content_type="text/plain", closed=True),
    ):
        with pytest.raises(st.StreamExists):
            await storage.create("/s", other)
    assert await read_all(storage, "/s") == b"hi"


async def test_missing_stream_raises_not_found_everywhere(storage: Storage) -> None:
    with pytest.raises(st.StreamNotFound):
        await storage.head("/nope")
    with pytest.raises(st.StreamNotFound):
        await storage.read("/nope", 0, 100)
    with pytest.raises(st.StreamNotFound):
        await storage.append("/nope", append(b"x"))
    with pytest.raises(st.StreamNotFound):
        await storage.delete("/nope")


async def test_appends_advance_the_tail_and_read_back_in_order(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    tails = []
    for chunk in (b"a", b"bc", b"def"):
        tails.append((await storage.append("/s", append(chunk))).info.tail)
    assert tails == [1, 3, 6]
    assert await read_all(storage, "/s") == b"abcdef"
    assert await read_all(storage, "/s", start=3) == b"def"
    at_tail = await storage.read("/s", 6, 100)
    assert at_tail.items == [] and at_tail.next == 6 and at_tail.up_to_date


async def test_read_from_now_is_the_tail(storage: Storage) -> None:
    await storage.create("/s", TEXT, [b"history"])
    result = await storage.read("/s", None, 100)
    assert result.items == [] and result.start == result.next == 7 and result.up_to_date


async def test_read_past_tail_is_refused(storage: Storage) -> None:
    await storage.create("/s", TEXT, [b"abc"])
    with pytest.raises(st.OffsetOutOfRange):
        await storage.read("/s", 4, 100)


async def test_reads_are_bounded_and_resume_exactly(storage: Storage) -> None:
    await storage.create("/s", StreamConfig(content_type="application/octet-stream"))
    payload = bytes(range(256)) * 64  # 16 KiB
    for i in range(0, len(payload), 1000):
        await storage.append("/s", append(payload[i : i + 1000], content_type="application/octet-stream"))
    first = await storage.read("/s", 0, 4096)
    assert 0 < sum(map(len, first.items)) <= 4096 + 1000
    assert not first.up_to_date
    assert await read_all(storage, "/s", max_bytes=1500) == payload


async def test_json_positions_count_messages(storage: Storage) -> None:
    await storage.create("/j", JSON, [b'{"a":1}', b"[2]"])
    result = await storage.append("/j", append([b'"x"', b"null"], content_type="application/json"))
    assert result.info.tail == 4 and result.info.is_json
    read = await storage.read("/j", 1, 1 << 20)
    assert read.items == [b"[2]", b'"x"', b"null"] and read.next == 4


async def test_content_type_must_match(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    with pytest.raises(st.ContentTypeMismatch):
        await storage.append("/s", append(b"x", content_type="application/json"))
    await storage.append("/s", append(b"x", content_type="Text/Plain; charset=utf-8"))


async def test_stream_seq_must_increase_bytewise(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    await storage.append("/s", append(b"1", seq="09"))
    await storage.append("/s", append(b"2", seq="10"))
    for stale in ("10", "09", "1", "0Z"):
        with pytest.raises(st.SequenceConflict):
            await storage.append("/s", append(b"x", seq=stale))
    await storage.append("/s", append(b"3", seq="a"))
    with pytest.raises(st.SequenceConflict):
        await storage.append("/s", append(b"x", seq="B"))  # 'B' < 'a': no case folding
    assert await read_all(storage, "/s") == b"123"


async def test_producer_lifecycle(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    ok = await storage.append("/s", append(b"a", producer=Producer("p", 0, 0)))
    assert (ok.duplicate, ok.producer_epoch, ok.producer_seq) == (False, 0, 0)
    await storage.append("/s", append(b"b", producer=Producer("p", 0, 1)))
    await storage.append("/s", append(b"c", producer=Producer("p", 0, 2)))
    dup = await storage.append("/s", append(b"B", producer=Producer("p", 0, 1)))
    assert dup.duplicate and dup.producer_seq == 2  # the highest accepted, not the request's
    with pytest.raises(st.ProducerSeqGap) as gap:
        await storage.append("/s", append(b"x", producer=Producer("p", 0, 5)))
    assert (gap.value.expected, gap.value.received) == (3, 5)
    with pytest.raises(st.InvalidProducerSeq):
        await storage.append("/s", append(b"x", producer=Producer("p", 1, 4)))
    await storage.append("/s", append(b"d", producer=Producer("p", 1, 0)))
    with pytest.raises(st.StaleEpoch) as stale:
        await storage.append("/s", append(b"x", producer=Producer("p", 0, 3)))
    assert stale.value.current_epoch == 1
    # A new producer may start at any epoch, but at sequence 0.
    await storage.append("/s", append(b"e", producer=Producer("q", 7, 0)))
    with pytest.raises(st.ProducerSeqGap):
        await storage.append("/s", append(b"x", producer=Producer("r", 0, 1)))
    assert await read_all(storage, "/s") == b"abcde"


async def test_producer_duplicate_wins_over_stream_seq(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    await storage.append("/s", append(b"a", producer=Producer("p", 0, 0), seq="001"))
    dup = await storage.append("/s", append(b"a", producer=Producer("p", 0, 0), seq="001"))
    assert dup.duplicate
    assert await read_all(storage, "/s") == b"a"


async def test_rejected_appends_change_nothing(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    await storage.append("/s", append(b"a", producer=Producer("p", 0, 0), seq="5"))
    before = await storage.head("/s")
    # Valid producer step but a Stream-Seq regression: the producer must not advance.
    with pytest.raises(st.SequenceConflict):
        await storage.append("/s", append(b"x", producer=Producer("p", 0, 1), seq="4"))
    with pytest.raises(st.ContentTypeMismatch):
        await storage.append("/s", append(b"x", producer=Producer("p", 0, 1), content_type="application/json"))
    ok = await storage.append("/s", append(b"b", producer=Producer("p", 0, 1), seq="6"))
    assert not ok.duplicate
    assert (await storage.head("/s")).tail == before.tail + 1


async def test_close_rules(storage: Storage) -> None:
    await storage.create("/s", TEXT, [b"a"])
    closed = await storage.append("/s", AppendRequest(content_type=None, items=[], close=True))
    assert closed.info.closed and closed.info.tail == 1
    again = await storage.append("/s", AppendRequest(content_type="application/json", items=[], close=True))
    assert again.info.closed and again.info.tail == 1
    with pytest.raises(st.StreamClosed) as err:
        await storage.append("/s", append(b"more"))
    assert err.value.tail == 1
    with pytest.raises(st.StreamClosed):
        await storage.append("/s", append(b"more", close=True))
    result = await storage.read("/s", 0, 100)
    assert result.at_end and result.items == [b"a"]


async def test_append_and_close_with_producer_is_retry_safe(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    await storage.append("/s", append(b"final", close=True, producer=Producer("p", 0, 0)))
    retry = await storage.append("/s", append(b"final", close=True, producer=Producer("p", 0, 0)))
    assert retry.duplicate and retry.info.closed
    with pytest.raises(st.StreamClosed):
        await storage.append("/s", append(b"x", producer=Producer("p", 0, 1)))
    with pytest.raises(st.StreamClosed):
        await storage.append("/s", append(b"x", close=True, producer=Producer("other", 0, 0)))


async def test_fencing_survives_close(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    await storage.append("/s", append(b"a", producer=Producer("p", 0, 0)))
    await storage.append("/s", append(b"b", close=True, producer=Producer("p", 1, 0)))
    with pytest.raises(st.StaleEpoch):
        await storage.append("/s", append(b"zombie", producer=Producer("p", 0, 1)))


async def test_create_closed(storage: Storage) -> None:
    result = await storage.create("/s", StreamConfig(content_type="text/plain", closed=True), [b"done"])
    assert result.info.closed and result.info.tail == 4
    assert (await storage.create("/s", StreamConfig(content_type="text/plain", closed=True))).created is False
    with pytest.raises(st.StreamExists):
        await storage.create("/s", TEXT)


async def test_delete_then_recreate_is_a_new_stream(storage: Storage) -> None:
    first = await storage.create("/s", TEXT, [b"old"])
    await storage.delete("/s")
    with pytest.raises(st.StreamNotFound):
        await storage.head("/s")
    second = await storage.create("/s", StreamConfig(content_type="application/json"))
    assert second.created and second.info.tail == 0
    assert second.info.stream_id != first.info.stream_id


async def test_ttl_expiry_and_sliding(storage: Storage) -> None:
    await storage.create("/ttl", StreamConfig(content_type="text/plain", ttl_seconds=1))
    await storage.create("/head", StreamConfig(content_type="text/plain", ttl_seconds=1))
    start = time.monotonic()
    await asyncio.sleep(0.6)
    await storage.read("/ttl", None, 10)  # a read (even at "now") slides the window
    await storage.head("/head")  # HEAD does not
    await asyncio.sleep(0.6)
    assert time.monotonic() - start >= 1.0
    await storage.head("/ttl")
    with pytest.raises(st.StreamNotFound):
        await storage.head("/head")
    # An expired path is free again, with any config.
    assert (await storage.create("/head", StreamConfig(content_type="application/json"))).created


async def test_expires_at_is_absolute(storage: Storage) -> None:
    deadline = time.time() + 0.5
    await storage.create("/s", StreamConfig(content_type="text/plain", expires_at=deadline))
    info = await storage.head("/s")
    assert info.expires_at == pytest.approx(deadline, abs=0.001)
    await storage.append("/s", append(b"x"))  # writes do not extend an absolute expiry
    await asyncio.sleep(max(0.0, deadline - time.time()) + 0.05)
    with pytest.raises(st.StreamNotFound):
        await storage.read("/s", 0, 10)


async def test_wait_for_data_times_out_without_changes(storage: Storage) -> None:
    await storage.create("/s", TEXT, [b"abc"])
    assert await storage.wait_for_data("/s", 3, 0.05) is False
    assert await storage.wait_for_data("/s", 1, 5) is True  # data already past the position


async def make_change(storage: Storage, path: str, change: str) -> None:
    """One of the changes every live reader must wake for."""
    if change == "append":
        await storage.append(path, append(b"x"))
    elif change == "close":
        await storage.append(path, AppendRequest(content_type=None, items=[], close=True))
    else:
        await storage.delete(path)


@pytest.mark.parametrize("change", ["append", "close", "delete"])
async def test_wait_for_data_wakes_on_change(storage: Storage, change: str) -> None:
    await storage.create("/s", TEXT)
    waiters = [asyncio.create_task(storage.wait_for_data("/s", 0, 10)) for _ in range(50)]
    await asyncio.sleep(0)  # let them register
    await make_change(storage, "/s", change)
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert results == [True] * 50


async def test_watch_resolves_at_once_when_there_is_something_to_read(storage: Storage) -> None:
    await storage.create("/s", TEXT, [b"abc"])
    await storage.create("/c", StreamConfig(content_type="text/plain", closed=True))
    for path, position in (("/s", 1), ("/c", 0), ("/missing", 0)):
        watch = await storage.watch(path, position)
        try:
            assert watch.future.done(), path
        finally:
            watch.close()


@pytest.mark.parametrize("change", ["append", "close", "delete"])
async def test_watch_resolves_on_a_change_from_any_process(
    storage_factory: StorageFactory, backend: str, change: str
) -> None:
    """A watch set up right after a read sees every later change, wherever it is made; closing it
    twice is harmless."""
    storage, other = await two_processes(storage_factory, backend)
    await storage.create("/s", TEXT, [b"ab"])
    result = await storage.read("/s", 0, 100)
    watches = [await storage.watch("/s", result.next) for _ in range(20)]
    try:
        assert not any(w.future.done() for w in watches)
        await make_change(other, "/s", change)
        await asyncio.wait_for(asyncio.gather(*(w.future for w in watches)), 5)
    finally:
        for w in watches:
            w.close()
            w.close()


async def test_a_change_between_read_and_watch_is_never_missed(storage_factory: StorageFactory, backend: str) -> None:
    """The race a live reader runs on every message: it reads, another process appends, and only
    then does the reader watch from the position it read up to. The watch must not sleep through
    that append."""
    storage, other = await two_processes(storage_factory, backend)
    await storage.create("/s", TEXT)
    for i in range(30):
        result = await storage.read("/s", None, 100)
        await other.append("/s", append(b"%d," % i))
        watch = await storage.watch("/s", result.next)
        try:
            await asyncio.wait_for(asyncio.shield(watch.future), 5)
        finally:
            watch.close()
        # And once it has read what woke it, a fresh watch waits again.
        caught_up = await storage.read("/s", result.next, 100)
        assert caught_up.items and caught_up.up_to_date
        quiet = await storage.watch("/s", caught_up.next)
        try:
            await asyncio.sleep(0.01)  # a window for a wrong wake-up, not synchronisation
            assert not quiet.future.done()
        finally:
            quiet.close()


async def test_concurrent_appends_are_all_kept_exactly_once(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    chunks = [f"<{i}>".encode() for i in range(200)]
    await asyncio.gather(*(storage.append("/s", append(c)) for c in chunks))
    data = await read_all(storage, "/s")
    assert sorted(data.replace(b">", b">\n").split()) == sorted(chunks)


async def test_concurrent_producer_requests_accept_each_seq_once(storage: Storage) -> None:
    await storage.create("/s", TEXT)
    await storage.append("/s", append(b"0", producer=Producer("p", 0, 0)))
    attempts = [storage.append("/s", append(b"1", producer=Producer("p", 0, 1))) for _ in range(20)]
    results = await asyncio.gather(*attempts)
    assert sum(not r.duplicate for r in results) == 1
    assert await read_all(storage, "/s") == b"01"
