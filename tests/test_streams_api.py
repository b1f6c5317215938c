"""The in-process API and durable generations, over every backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from durable_streams_asgi import AccessDenied, DurableStreams, StreamClosed, StreamNotFound
from durable_streams_asgi.storage.base import Storage

from .conftest import StorageFactory


@pytest.fixture
async def streams(storage: Storage) -> AsyncIterator[DurableStreams]:
    s = DurableStreams(storage, long_poll_timeout=2, shutdown_timeout=0.5)
    yield s
    await s.generations.shutdown()


def client_for(streams: DurableStreams) -> httpx.AsyncClient:
    app = Starlette(routes=[Mount("/v1/stream", app=streams.app)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1/stream")


async def collect(streams: DurableStreams, path: str, **kw: object) -> list[object]:
    out: list[object] = []
    async for chunk in streams.read(path, **kw):  # type: ignore[arg-type]
        out.extend(chunk.messages)
    return out


async def test_in_process_writes_are_what_http_readers_see(streams: DurableStreams) -> None:
    created, info = await streams.create("chat/1", content_type="application/json", messages=[{"n": 0}])
    assert created and info.tail == 1
    await streams.append_json("/chat/1", {"n": 1}, {"n": 2})
    await streams.append("/chat/1", '[{"n": 3}, {"n": 4}]', content_type="application/json")
    async with client_for(streams) as c:
        r = await c.get("/chat/1")
        assert r.json() == [{"n": i} for i in range(5)]
        await c.post("/chat/1", headers={"Content-Type": "application/json"}, content=b'{"n": 5}')
    assert await collect(streams, "/chat/1") == [{"n": i} for i in range(6)]


async def test_in_process_append_wakes_http_long_poll(streams: DurableStreams) -> None:
    await streams.create("/t", content_type="text/plain", data="a")
    async with client_for(streams) as c:
        poll = asyncio.create_task(c.get("/t", params={"offset": "now", "live": "long-poll"}))
        await asyncio.sleep(0.05)
        await streams.append("/t", "b", content_type="text/plain")
        r = await asyncio.wait_for(poll, 5)
    assert r.status_code == 200 and r.text == "b"


async def test_live_read_follows_until_close_and_resumes_from_offsets(streams: DurableStreams) -> None:
    await streams.create("/t", content_type="text/plain")
    got: list[str] = []
    offsets: list[str] = []

    async def reader() -> None:
        async for chunk in streams.read("/t", live=True):
            got.append(chunk.text)
            offsets.append(chunk.offset)

    task = asyncio.create_task(reader())
    for word in ("one ", "two ", "three"):
        await streams.append("/t", word, content_type="text/plain")
        await asyncio.sleep(0.01)
    await streams.close("/t")
    await asyncio.wait_for(task, 5)
    assert "".join(got) == "one two three"
    resumed = [c.text async for c in streams.read("/t", offset=offsets[1])]
    assert "".join(resumed) in ("two three", "three")  # after the 2nd chunk read, whatever it held
    with pytest.raises(StreamClosed):
        await streams.append("/t", "late", content_type="text/plain")


async def test_bad_paths_are_value_errors(streams: DurableStreams) -> None:
    with pytest.raises(ValueError):
        await streams.create("/a//b")
    with pytest.raises(StreamNotFound):
        await streams.head("/missing")


async def tokens(words: list[str], delay: float = 0.0, fail_after: int | None = None) -> AsyncIterator[dict[str, str]]:
    for i, word in enumerate(words):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("model exploded")
        await asyncio.sleep(delay)
        yield {"type": "text-delta", "delta": word}


async def test_generation_writes_everything_batches_and_closes(streams: DurableStreams) -> None:
    words = [f"w{i} " for i in range(200)]
    generation = await streams.start_generation("/gen/1", tokens(words), linger=0.02)
    final = await asyncio.wait_for(generation.wait(), 10)
    messages = await collect(streams, "/gen/1")
    assert [m["delta"] for m in messages] == words  # type: ignore[index]
    info = await streams.head("/gen/1")
    assert info.closed and final.endswith(str(info.tail).zfill(16))


async def test_generation_batches_small_chunks_into_few_writes(storage: Storage) -> None:
    writes = 0
    original = storage.append

    async def counting(path, request):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        return await original(path, request)

    storage.append = counting  # type: ignore[method-assign]
    streams = DurableStreams(storage)
    await (await streams.start_generation("/g", tokens([str(i) for i in range(500)]), linger=0.05)).wait()
    assert len(await collect(streams, "/g")) == 500
    assert writes < 20  # 500 tokens arriving at once: a handful of batched appends, not 500


async def test_source_failure_appends_an_error_record_and_closes(streams: DurableStreams) -> None:
    generation = await streams.start_generation("/gen/f", tokens(["a", "b", "c"], fail_after=2))
    await asyncio.wait_for(generation.wait(), 5)
    messages = await collect(streams, "/gen/f")
    assert messages == [
        {"type": "text-delta", "delta": "a"},
        {"type": "text-delta", "delta": "b"},
        {"type": "error", "errorText": "model exploded"},
    ]
    assert (await streams.head("/gen/f")).closed


async def test_text_generations_and_custom_error_records(streams: DurableStreams) -> None:
    async def words() -> AsyncIterator[str]:
        yield "hello "
        raise ValueError("boom")

    gen = await streams.start_generation(
        "/gen/t", words(), content_type="text/plain", error_record=lambda exc: f"<{exc}>"
    )
    await gen.wait()
    assert "".join([c.text async for c in streams.read("/gen/t")]) == "hello <boom>"


async def test_generation_survives_the_client_that_started_it(streams: DurableStreams) -> None:
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        request = Request(scope, receive)
        generation = await streams.start_generation("/gen/d", tokens(["x"] * 20, delay=0.01))
        from durable_streams_asgi import generation_response

        response = generation_response(generation, streams.url_for(str(request.base_url), "/gen/d"), mode="await")
        await response(scope, receive, send)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        request = asyncio.create_task(c.post("/start"))
        await asyncio.sleep(0.03)
        request.cancel()  # the client goes away mid-generation
        with pytest.raises(asyncio.CancelledError):
            await request
    await asyncio.sleep(0.5)
    assert len(await collect(streams, "/gen/d")) == 20
    assert (await streams.head("/gen/d")).closed


async def test_shutdown_waits_then_interrupts_with_a_record(storage_factory: StorageFactory) -> None:
    streams = DurableStreams(await storage_factory(), shutdown_timeout=0.2)
    quick = await streams.start_generation("/q", tokens(["a"]))
    slow = await streams.start_generation("/s", tokens(["b"] * 1000, delay=0.01))
    await asyncio.sleep(0.05)
    await streams.generations.shutdown()
    assert quick.done and slow.done
    messages = await collect(streams, "/s")
    info = await streams.head("/s")
    assert messages[-1] == {"type": "error", "errorText": "generation interrupted: server shutting down"}, (
        len(messages),
        messages[-3:],
        info.closed,
        slow.task,
    )
    assert (await streams.head("/s")).closed and (await streams.head("/q")).closed


class SlowAfterShutdown:
    """Real storage whose appends take ``delay`` seconds once ``slow`` is set (a Redis failing
    over as the server stops)."""

    def __init__(self, storage: Storage, delay: float) -> None:
        self._storage = storage
        self.delay = delay
        self.slow = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._storage, name)

    async def append(self, path: str, request: object) -> object:
        if self.slow:
            await asyncio.sleep(self.delay)  # (the fault itself: a storage that is slow to answer)
        return await self._storage.append(path, request)  # type: ignore[arg-type]


async def test_an_interrupted_generation_ends_its_stream_even_when_the_storage_is_slow(
    storage_factory: StorageFactory,
) -> None:
    """Its cleanup (the interrupted append replayed, the reason, the close) runs shielded after
    the shutdown's cancel; cancelled again too soon, it was cut short and the stream stayed open,
    with readers waiting for an end that never came."""
    slow = SlowAfterShutdown(await storage_factory(), delay=0.3)
    streams = DurableStreams(slow, shutdown_timeout=0.1)  # type: ignore[arg-type]
    generation = await streams.start_generation("/slow", tokens(["b"] * 1000, delay=0.01))
    await asyncio.sleep(0.05)
    slow.slow = True
    await streams.generations.shutdown()
    assert generation.done
    info = await streams.head("/slow")
    assert info.closed
    messages = await collect(streams, "/slow")
    assert messages[-1] == {"type": "error", "errorText": "generation interrupted: server shutting down"}


async def test_response_helpers_follow_the_transport_contract(streams: DurableStreams) -> None:
    from durable_streams_asgi import generation_response, reconnect_response

    generation = await streams.start_generation("/r", tokens(["a", "b"]))
    url = streams.url_for("http://example.test/", "/r")
    assert url == "http://example.test/v1/stream/r"
    immediate = generation_response(generation, url)
    assert immediate.status_code == 201 and immediate.headers["location"] == url
    assert json.loads(immediate.body) == {"streamUrl": url}

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await generation_response(generation, url, mode="await")(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/")
    assert r.status_code == 200 and r.headers["location"] == url
    body = r.json()
    assert body["streamUrl"] == url and body["finalOffset"] == await generation.wait()
    assert reconnect_response(None).status_code == 204
    active = reconnect_response(url)
    assert active.status_code == 200 and active.headers["location"] == url


async def test_authorize_hook(storage: Storage) -> None:
    calls: list[tuple[str, str]] = []

    async def authorize(request: Request, action: str, path: str) -> bool:
        calls.append((action, path))
        if request.headers.get("authorization") == "Bearer nope":
            raise AccessDenied(401, "sign in first", {"WWW-Authenticate": "Bearer"})
        return action == "read" or request.headers.get("authorization") == "Bearer writer"

    streams = DurableStreams(storage, authorize=authorize)
    await streams.create("/a", content_type="text/plain", data="in-process writes skip the hook")
    writer = {"Authorization": "Bearer writer", "Content-Type": "text/plain"}
    async with client_for(streams) as c:
        assert (await c.get("/a")).status_code == 200
        assert (await c.post("/a", headers={"Content-Type": "text/plain"}, content=b"x")).status_code == 403
        r = await c.post("/a", headers={"Authorization": "Bearer nope", "Content-Type": "text/plain"}, content=b"x")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.text == "sign in first"
        assert (await c.post("/a", headers=writer, content=b"!")).status_code == 204
        assert (await c.post("/a", headers={**writer, "Stream-Closed": "true"})).status_code == 204
        assert (await c.put("/f", headers={**writer, "Stream-Forked-From": "/v1/stream/a"})).status_code == 201
        assert (await c.delete("/f")).status_code == 403
        assert (await c.options("/a")).status_code == 204  # preflights are never refused
    assert ("close", "/a") in calls and ("create", "/f") in calls and ("read", "/a") in calls


async def test_the_stream_exists_as_soon_as_start_generation_returns(streams: DurableStreams) -> None:
    generation = await streams.start_generation("/early", tokens(["a"], delay=0.2))
    info = await streams.head("/early")  # a client given the URL reads at once: never a 404
    assert not info.closed and not generation.done
    await generation.wait()


async def test_authorize_decides_on_what_a_post_does_not_on_its_headers(storage: Storage) -> None:
    """A close with a body of unknown length (chunked; HTTP/2 sends no Content-Length either) is
    authorized as a close before its body is read; once data arrives it is an append and is asked
    for again: a caller allowed to close but not to append writes nothing."""
    calls: list[str] = []

    def authorize(request: Request, action: str, path: str) -> bool:
        calls.append(action)
        return action in ("read", "close")

    streams = DurableStreams(storage, authorize=authorize)
    await streams.create("/c", content_type="text/plain", data="kept")

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        if data:
            yield data

    closing = {"Content-Type": "text/plain", "Stream-Closed": "true"}
    async with client_for(streams) as c:
        r = await c.post("/c", headers=closing, content=chunked(b"smuggled"))
        assert r.status_code == 403 and calls == ["close", "append"]
        info = await streams.head("/c")
        assert info.tail == 4 and not info.closed
        # A close of unknown length that turns out empty is a close, and needs no more.
        calls.clear()
        assert (await c.post("/c", headers=closing, content=chunked(b""))).status_code == 204
        assert calls == ["close"] and (await streams.head("/c")).closed
