"""Forking (PROTOCOL.md section 4.2), run against every backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from durable_streams_asgi.storage import base as st
from durable_streams_asgi.storage.base import AppendRequest, Producer, Storage, StreamConfig

from .test_storage import append, backend, read_all  # noqa: F401 (backend: the same backends)

TEXT = StreamConfig(content_type="text/plain")


def fork(source: str, offset: int | None = None, sub: int = 0, **kw: object) -> StreamConfig:
    return StreamConfig(
        content_type=kw.pop("content_type", None),
        fork_from=source,
        fork_offset=offset,  # type: ignore[arg-type]
        fork_sub_offset=sub,
        **kw,
    )  # type: ignore[arg-type]


async def test_fork_inherits_up_to_the_fork_point_and_diverges(storage: Storage) -> None:
    await storage.create("/src", TEXT, [b"first"])
    await storage.append("/src", append(b"second"))
    created = await storage.create("/f", fork("/src", 5))
    assert created.created and created.info.tail == 5 and created.info.content_type == "text/plain"
    await storage.append("/f", append(b"+fork"))
    await storage.append("/src", append(b"+src"))
    assert await read_all(storage, "/f") == b"first+fork"
    assert await read_all(storage, "/src") == b"firstsecond+src"
    # Offsets are shared: reading the fork from the fork point gives only its own data.
    assert await read_all(storage, "/f", start=5) == b"+fork"


async def test_fork_defaults_to_the_source_tail_and_sub_offsets_cut_inside_appends(storage: Storage) -> None:
    await storage.create("/src", TEXT, [b"hello"])
    assert (await storage.create("/all", fork("/src"))).info.tail == 5
    assert (await storage.create("/cut", fork("/src", 0, 3), [b"XY"])).info.tail == 5
    assert await read_all(storage, "/cut") == b"helXY"
    for sub in (6, 10):
        with pytest.raises(st.InvalidForkSubOffset):
            await storage.create("/bad", fork("/src", 0, sub))
    with pytest.raises(st.OffsetOutOfRange):
        await storage.create("/bad", fork("/src", 6))


async def test_json_sub_offsets_count_messages(storage: Storage) -> None:
    await storage.create("/j", StreamConfig(content_type="application/json"), [b'{"a":1}', b'{"b":2}', b'{"c":3}'])
    result = await storage.create("/jf", fork("/j", 0, 2))
    assert result.info.is_json and result.info.tail == 2
    assert (await storage.read("/jf", 0, 1 << 20)).items == [b'{"a":1}', b'{"b":2}']
    with pytest.raises(st.InvalidForkSubOffset):
        await storage.create("/bad", fork("/j", 0, 4))


async def test_chained_forks_compose(storage: Storage) -> None:
    await storage.create("/l0", TEXT, [b"abcdef"])
    await storage.create("/l1", fork("/l0", 0, 4))
    await storage.create("/l2", fork("/l1", 0, 2))
    await storage.append("/l2", append(b"Z"))
    await storage.append("/l1", append(b"!"))
    assert await read_all(storage, "/l2") == b"abZ"
    assert await read_all(storage, "/l1") == b"abcd!"
    # Small read budgets walk across every boundary without losing or repeating a byte.
    assert await read_all(storage, "/l2", max_bytes=1) == b"abZ"


async def test_fork_creation_errors(storage: Storage) -> None:
    await storage.create("/src", TEXT, [b"x"])
    with pytest.raises(st.ForkSourceNotFound):
        await storage.create("/f", fork("/missing"))
    with pytest.raises(st.ContentTypeMismatch):
        await storage.create("/f", fork("/src", content_type="application/json"))
    await storage.create("/f", fork("/src", 0, content_type="TEXT/plain"))
    assert (await storage.create("/f", fork("/src", 0, content_type="text/plain"))).created is False
    assert (await storage.create("/f", fork("/src", 0))).created is False
    with pytest.raises(st.StreamExists):
        await storage.create("/f", fork("/src", 0, 1))
    with pytest.raises(st.StreamExists):
        await storage.create("/f", TEXT)
    # A rejected fork holds no reference: the source deletes for good.
    await storage.delete("/f")
    await storage.delete("/src")
    with pytest.raises(st.StreamNotFound):
        await storage.head("/src")


async def test_forks_start_open_with_fresh_writer_state(storage: Storage) -> None:
    await storage.create("/src", TEXT)
    await storage.append("/src", append(b"abc", producer=Producer("p", 3, 0), seq="m"))
    await storage.append("/src", AppendRequest(content_type=None, items=[], close=True))
    await storage.create("/f", fork("/src"))
    assert not (await storage.head("/f")).closed
    ok = await storage.append("/f", append(b"d", producer=Producer("p", 0, 0), seq="a"))
    assert not ok.duplicate
    assert await read_all(storage, "/f") == b"abcd"


async def test_soft_delete_and_cascading_cleanup(storage: Storage) -> None:
    await storage.create("/l0", TEXT, [b"A"])
    await storage.create("/l1", fork("/l0"), [b"B"])
    await storage.create("/l2", fork("/l1"), [b"C"])
    await storage.delete("/l0")
    await storage.delete("/l1")
    for path in ("/l0", "/l1"):
        for call in (
            storage.head(path),
            storage.read(path, 0, 10),
            storage.append(path, append(b"x")),
            storage.delete(path),
        ):
            with pytest.raises(st.StreamGone):
                await call
        with pytest.raises(st.StreamExists):
            await storage.create(path, TEXT)
    with pytest.raises(st.ForkSourceGone):
        await storage.create("/l3", fork("/l1"))
    assert await read_all(storage, "/l2") == b"ABC"
    await storage.delete("/l2")
    for path in ("/l0", "/l1", "/l2"):
        with pytest.raises(st.StreamNotFound):
            await storage.head(path)
    assert (await storage.create("/l0", TEXT)).created


async def test_live_source_survives_its_forks(storage: Storage) -> None:
    await storage.create("/src", TEXT, [b"alive"])
    await storage.create("/f1", fork("/src"))
    await storage.create("/f2", fork("/src"))
    await storage.delete("/f1")
    await storage.delete("/f2")
    assert await read_all(storage, "/src") == b"alive"


async def test_fork_waiters_ignore_source_appends(storage: Storage) -> None:
    await storage.create("/src", TEXT, [b"base"])
    await storage.create("/f", fork("/src"))
    waiter = asyncio.create_task(storage.wait_for_data("/f", 4, 5))
    await asyncio.sleep(0.05)
    await storage.append("/src", append(b"source only"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await storage.append("/f", append(b"fork"))
    assert await asyncio.wait_for(waiter, 5) is True


async def test_fork_expiry_inheritance(storage: Storage) -> None:
    await storage.create("/ttl", StreamConfig(content_type="text/plain", ttl_seconds=3600))
    assert (await storage.create("/f1", fork("/ttl"))).info.ttl_seconds == 3600
    assert (await storage.create("/f2", fork("/ttl", ttl_seconds=99999))).info.ttl_seconds == 99999
    deadline = time.time() + 3600
    await storage.create("/abs", StreamConfig(content_type="text/plain", expires_at=deadline))
    inherited = (await storage.create("/f3", fork("/abs"))).info
    assert inherited.expires_at == pytest.approx(deadline, abs=0.001) and inherited.ttl_seconds is None
    own = (await storage.create("/f4", fork("/abs", ttl_seconds=60))).info
    assert own.ttl_seconds == 60 and own.expires_at is None


async def test_expired_source_with_forks_is_gone_but_still_readable_through_them(storage: Storage) -> None:
    await storage.create("/src", StreamConfig(content_type="text/plain", ttl_seconds=1), [b"kept"])
    await storage.create("/f", fork("/src", ttl_seconds=60))
    await asyncio.sleep(1.1)
    with pytest.raises((st.StreamGone, st.StreamNotFound)):
        await storage.head("/src")
    assert await read_all(storage, "/f") == b"kept"


async def test_racing_fork_creation_and_source_deletion_never_orphans(storage: Storage) -> None:
    for round_ in range(20):
        src = f"/src{round_}"
        await storage.create(src, TEXT, [b"data"])
        forks = [storage.create(f"{src}/f{i}", fork(src)) for i in range(5)]
        results = await asyncio.gather(storage.delete(src), *forks, return_exceptions=True)
        made = [f"{src}/f{i}" for i, r in enumerate(results[1:]) if not isinstance(r, BaseException)]
        for r in results[1:]:
            if isinstance(r, BaseException):
                assert isinstance(r, (st.ForkSourceGone, st.ForkSourceNotFound))
        for path in made:
            assert await read_all(storage, path) == b"data"
            await storage.delete(path)
        with pytest.raises(st.StreamNotFound):
            await storage.head(src)


async def test_racing_identical_fork_creates_make_one_fork(storage: Storage) -> None:
    await storage.create("/src", TEXT, [b"x"])
    results = await asyncio.gather(*(storage.create("/f", fork("/src", 0)) for _ in range(10)))
    assert sum(r.created for r in results) == 1
    await storage.delete("/f")
    await storage.delete("/src")  # one reference was taken and released
    with pytest.raises(st.StreamNotFound):
        await storage.head("/src")
