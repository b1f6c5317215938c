"""The HTTP surface of the mounted app, over every backend."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from durable_streams_asgi.storage.base import AppendRequest, Storage, StreamConfig

from .conftest import make_host_app, sse_events

TEXT = {"Content-Type": "text/plain"}
JSON_CT = {"Content-Type": "application/json"}


async def test_create_append_read_round_trip(client: httpx.AsyncClient) -> None:
    r = await client.put("/chat/room-1", headers=TEXT, content=b"hello ")
    assert r.status_code == 201
    assert r.headers["content-type"] == "text/plain"
    assert r.headers["location"] == "http://testserver/v1/stream/chat/room-1"
    created_offset = r.headers["stream-next-offset"]
    r = await client.post("/chat/room-1", headers=TEXT, content=b"world")
    assert r.status_code == 204
    assert r.headers["stream-next-offset"] > created_offset
    r = await client.get("/chat/room-1", params={"offset": "-1"})
    assert r.status_code == 200 and r.content == b"hello world"
    assert r.headers["stream-up-to-date"] == "true"
    assert "stream-closed" not in r.headers
    r2 = await client.get("/chat/room-1", params={"offset": created_offset})
    assert r2.content == b"world"
    assert r2.headers["stream-next-offset"] == r.headers["stream-next-offset"]


async def test_put_idempotency(client: httpx.AsyncClient) -> None:
    assert (await client.put("/s", headers={**JSON_CT, "Stream-TTL": "3600"})).status_code == 201
    r = await client.put("/s", headers={"Content-Type": "APPLICATION/JSON", "Stream-TTL": "3600"})
    assert r.status_code == 200 and "location" not in r.headers
    assert (await client.put("/s", headers={**JSON_CT, "Stream-TTL": "60"})).status_code == 409
    assert (await client.put("/s", headers=TEXT)).status_code == 409
    assert (
        await client.put("/s", headers={**JSON_CT, "Stream-TTL": "3600", "Stream-Closed": "true"})
    ).status_code == 409


async def test_put_without_content_type_defaults_to_octet_stream(client: httpx.AsyncClient) -> None:
    r = await client.put("/bin")
    assert r.status_code == 201 and r.headers["content-type"] == "application/octet-stream"


async def test_binary_bytes_round_trip_exactly(client: httpx.AsyncClient) -> None:
    payload = bytes(range(256)) * 40
    await client.put("/bin", headers={"Content-Type": "application/octet-stream"}, content=payload[:100])
    await client.post("/bin", headers={"Content-Type": "application/octet-stream"}, content=payload[100:])
    assert (await client.get("/bin")).content == payload


async def test_chunked_request_body(client: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(20):
            yield f"part{i};".encode()

    await client.put("/s", headers=TEXT)
    r = await client.post("/s", headers=TEXT, content=body())
    assert r.status_code == 204
    assert (await client.get("/s")).content == b"".join(f"part{i};".encode() for i in range(20))


async def test_head_reports_metadata_and_no_store(client: httpx.AsyncClient) -> None:
    await client.put("/t", headers={**TEXT, "Stream-TTL": "3600"}, content=b"abc")
    r = await client.head("/t")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["stream-ttl"] == "3600" and "stream-expires-at" not in r.headers
    assert "no-store" in r.headers["cache-control"]
    assert r.headers["stream-next-offset"] == (await client.get("/t")).headers["stream-next-offset"]
    await client.put("/e", headers={**TEXT, "Stream-Expires-At": "2099-01-02T03:04:05.250Z"})
    assert (await client.head("/e")).headers["stream-expires-at"] == "2099-01-02T03:04:05.250Z"
    assert (await client.head("/missing")).status_code == 404


async def test_json_mode(client: httpx.AsyncClient) -> None:
    assert (await client.put("/j", headers=JSON_CT, content=b"[]")).status_code == 201
    r = await client.get("/j")
    assert r.json() == [] and r.headers["content-type"] == "application/json"
    await client.post("/j", headers=JSON_CT, content=b'{"a": 1}')
    await client.post("/j", headers={"Content-Type": "application/json; charset=utf-8"}, content=b"[[1,2], 3]")
    await client.post("/j", headers=JSON_CT, content=b"[[[1]]]")
    r = await client.get("/j", params={"offset": "-1"})
    assert r.json() == [{"a": 1}, [1, 2], 3, [[1]]]
    assert (await client.post("/j", headers=JSON_CT, content=b"[]")).status_code == 400
    assert (await client.post("/j", headers=JSON_CT, content=b"{ invalid json }")).status_code == 400
    assert len((await client.get("/j")).json()) == 4  # rejected appends wrote nothing
    now = await client.get("/j", params={"offset": "now"})
    assert now.content == b"[]" and now.headers["stream-up-to-date"] == "true"
    assert "no-store" in now.headers["cache-control"] and "etag" not in now.headers


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/s", TEXT, b"", 400),  # empty append
        ("POST", "/s", {}, b"data", 400),  # no content type
        ("POST", "/s", {"Content-Type": "application/json"}, b"x", 409),  # wrong content type
        ("POST", "/s", {**TEXT, "Producer-Id": "p"}, b"x", 400),
        ("POST", "/s", {**TEXT, "Producer-Id": "p", "Producer-Epoch": "1e3", "Producer-Seq": "0"}, b"x", 400),
        ("POST", "/s", {**TEXT, "Stream-Seq": ""}, b"x", 400),
        ("POST", "/missing", TEXT, b"x", 404),
        ("PUT", "/n", {**TEXT, "Stream-TTL": "-1"}, b"", 400),
        ("PUT", "/n", {**TEXT, "Stream-TTL": "10", "Stream-Expires-At": "2099-01-01T00:00:00Z"}, b"", 400),
        ("PUT", "/n", {**TEXT, "Stream-Expires-At": "tomorrow"}, b"", 400),
        ("PUT", "/n", JSON_CT, b"[1,", 400),
        ("PUT", "/a//b", TEXT, b"", 400),
        ("PUT", "/a/%2e%2e/b", TEXT, b"", 400),
        ("PUT", "/a%00b", TEXT, b"", 400),
        ("PUT", "/" + "x" * 1100, TEXT, b"", 414),
        ("PUT", "/n", {**TEXT, "Stream-Fork-Offset": "0000000000000000_0000000000000000"}, b"", 400),
        ("PUT", "/n", {**TEXT, "Stream-Forked-From": "http://[x]/v1/stream/s"}, b"", 400),  # urlsplit raises
        ("PUT", "/n", {**TEXT, "Stream-Forked-From": "http://[::1/v1/stream/s"}, b"", 400),
        ("GET", "/s?offset=abc", {}, b"", 400),
        ("GET", "/s?offset=", {}, b"", 400),
        ("GET", "/s?offset=-1&offset=now", {}, b"", 400),
        ("GET", "/s?live=long-poll", {}, b"", 400),
        ("GET", "/s?offset=-1&live=forever", {}, b"", 400),
        ("GET", "/s?offset=0000000000000000_0000000000009999", {}, b"", 400),  # past the tail
        ("GET", "/missing?offset=now&live=sse", {}, b"", 404),
        ("DELETE", "/missing", {}, b"", 404),
        ("PATCH", "/s", TEXT, b"x", 405),
    ],
)
async def test_bad_requests_get_a_short_4xx_and_change_nothing(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    await client.put("/s", headers=TEXT, content=b"keep")
    r = await client.request(method, path, headers=headers, content=body)
    assert r.status_code == status, r.text
    assert r.headers["x-content-type-options"] == "nosniff"
    assert len(r.content) < 200 and b"Traceback" not in r.content
    assert (await client.get("/s")).content == b"keep"
    assert (await client.head("/n")).status_code == 404


async def test_oversize_bodies_get_413_and_write_nothing(storage: Storage) -> None:
    app = make_host_app(storage, max_body_size=1000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1/stream") as c:
        await c.put("/s", headers=TEXT, content=b"ok")
        assert (await c.post("/s", headers=TEXT, content=b"x" * 1001)).status_code == 413

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(20):
                yield b"y" * 100

        assert (await c.post("/s", headers=TEXT, content=chunked())).status_code == 413
        assert (await c.put("/t", headers=TEXT, content=b"z" * 2000)).status_code == 413
        assert (await c.get("/s")).content == b"ok"
        assert (await c.head("/t")).status_code == 404


@pytest.fixture
def quick_live(app_options: dict[str, object]) -> None:
    # Live reads through the in-process transport are buffered until they end: keep them short.
    app_options.update(long_poll_timeout=0.1, sse_max_duration=0.1)


@pytest.mark.usefixtures("quick_live")
async def test_random_garbage_headers_never_cause_5xx(client: httpx.AsyncClient) -> None:
    rng = random.Random(1234)
    names = [
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-Seq",
        "Stream-Closed",
        "Producer-Id",
        "Producer-Epoch",
        "Producer-Seq",
        "Content-Type",
        "If-None-Match",
        "Stream-Forked-From",
        "Stream-Fork-Offset",
    ]
    alphabet = "0123456789-+.eE:TZ/ ,;=abc\u00e9"
    await client.put("/g", headers=TEXT, content=b"base")
    for _ in range(300):
        headers = {
            name: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            for name in rng.sample(names, rng.randint(1, 4))
        }
        method = rng.choice(["PUT", "POST", "GET", "HEAD", "DELETE"])
        query = rng.choice(
            [
                "",
                "?offset=" + rng.choice(["-1", "now", "x", "0000000000000000_0000000000000001"]),
                "?offset=now&live=long-poll",
                "?offset=-1&live=sse&cursor=zz",
            ]
        )
        path = rng.choice(["/g", "/fresh", "/g/sub"])
        try:
            r = await asyncio.wait_for(
                client.request(method, path + query, headers={k: v.encode() for k, v in headers.items()}, content=b"x"),
                timeout=10,
            )
        except httpx.LocalProtocolError:
            continue  # httpx refused to send the header; nothing reached the server
        assert r.status_code < 500, (method, path, query, headers, r.text)
        if path == "/g" and method == "DELETE" and r.status_code == 204:
            await client.put("/g", headers=TEXT, content=b"base")


async def test_security_and_cors_headers_everywhere(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT, content=b"x")
    for r in (
        await client.get("/s"),
        await client.head("/s"),
        await client.get("/missing"),
        await client.post("/s", headers=TEXT, content=b"y"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cross-origin-resource-policy"] == "cross-origin"
        assert r.headers["content-security-policy"] == "sandbox; default-src 'none'"
        assert r.headers["access-control-allow-origin"] == "*"
        assert "stream-next-offset" in r.headers["access-control-expose-headers"].lower()


async def test_cors_preflight_allows_if_none_match_even_for_unknown_streams(client: httpx.AsyncClient) -> None:
    r = await client.options(
        "/never-created",
        headers={
            "Origin": "https://example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "if-none-match",
        },
    )
    assert r.status_code == 204
    allowed = r.headers["access-control-allow-headers"].lower()
    for header in ("if-none-match", "producer-id", "stream-closed", "stream-ttl", "content-type"):
        assert header in allowed
    assert "PUT" in r.headers["access-control-allow-methods"]


async def test_cors_origin_list(storage: Storage) -> None:
    app = make_host_app(storage, cors_origins=["https://good.example"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1/stream") as c:
        good = await c.get("/x", headers={"Origin": "https://good.example"})
        bad = await c.get("/x", headers={"Origin": "https://evil.example"})
    assert good.headers["access-control-allow-origin"] == "https://good.example"
    assert "access-control-allow-origin" not in bad.headers
    assert good.headers["vary"] == "Origin"


async def test_etag_and_304_vary_with_data_and_closure(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT, content=b"abc")
    r = await client.get("/s")
    etag = r.headers["etag"]
    assert r.headers["cache-control"] == "public, max-age=60, stale-while-revalidate=300"
    not_modified = await client.get("/s", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert (await client.get("/s", headers={"If-None-Match": '"wrong"'})).status_code == 200
    await client.post("/s", headers={"Stream-Closed": "true"})
    r = await client.get("/s", headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.headers["stream-closed"] == "true" and r.headers["etag"] != etag


async def test_private_cache_visibility(storage: Storage) -> None:
    app = make_host_app(storage, cache_visibility="private")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1/stream") as c:
        await c.put("/s", headers=TEXT, content=b"x")
        assert (await c.get("/s")).headers["cache-control"].startswith("private,")


async def test_close_flows(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT, content=b"first")
    r = await client.post("/s", headers={**TEXT, "Stream-Closed": "true"}, content=b"+last")
    assert r.status_code == 204 and r.headers["stream-closed"] == "true"
    final = r.headers["stream-next-offset"]
    r = await client.post("/s", headers={"Stream-Closed": "true"})
    assert r.status_code == 204 and r.headers["stream-closed"] == "true" and r.headers["stream-next-offset"] == final
    r = await client.post("/s", headers=TEXT, content=b"late")
    assert r.status_code == 409 and r.headers["stream-closed"] == "true" and r.headers["stream-next-offset"] == final
    eof = await client.get("/s", params={"offset": final})
    assert eof.content == b"" and eof.headers["stream-closed"] == "true" and eof.headers["stream-up-to-date"] == "true"
    lp = await client.get("/s", params={"offset": final, "live": "long-poll"})
    assert lp.status_code == 204 and lp.headers["stream-closed"] == "true" and "stream-cursor" not in lp.headers


async def test_producer_statuses_and_headers(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT)

    def producer(epoch: int, seq: int) -> dict[str, str]:
        return {**TEXT, "Producer-Id": "p1", "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}

    r = await client.post("/s", headers=producer(0, 0), content=b"a")
    assert r.status_code == 200 and (r.headers["producer-epoch"], r.headers["producer-seq"]) == ("0", "0")
    r = await client.post("/s", headers=producer(0, 0), content=b"a")
    assert r.status_code == 204 and r.headers["producer-seq"] == "0"
    r = await client.post("/s", headers=producer(0, 3), content=b"x")
    assert r.status_code == 409
    assert (r.headers["producer-expected-seq"], r.headers["producer-received-seq"]) == ("1", "3")
    assert (await client.post("/s", headers=producer(2, 0), content=b"b")).status_code == 200
    r = await client.post("/s", headers=producer(1, 0), content=b"x")
    assert r.status_code == 403 and r.headers["producer-epoch"] == "2"
    r = await client.post("/s", headers={**producer(2, 1), "Stream-Closed": "true"})
    assert r.status_code == 204 and r.headers["stream-closed"] == "true" and r.headers["producer-seq"] == "1"
    assert (await client.get("/s")).content == b"ab"


async def test_long_poll_times_out_with_204_and_cursor(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT, content=b"abc")
    tail = (await client.get("/s")).headers["stream-next-offset"]
    r = await client.get("/s", params={"offset": tail, "live": "long-poll"})
    assert r.status_code == 204
    assert r.headers["stream-next-offset"] == tail and r.headers["stream-up-to-date"] == "true"
    cursor = r.headers["stream-cursor"]
    assert cursor.isdigit()
    r = await client.get("/s", params={"offset": tail, "live": "long-poll", "cursor": cursor})
    assert int(r.headers["stream-cursor"]) > int(cursor)


async def test_long_poll_wakes_on_append(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT, content=b"old")
    poll = asyncio.create_task(client.get("/s", params={"offset": "now", "live": "long-poll"}))
    await asyncio.sleep(0.05)  # give the poll time to start waiting; it must not see "old"
    await client.post("/s", headers=TEXT, content=b"new")
    r = await asyncio.wait_for(poll, 5)
    assert r.status_code == 200 and r.content == b"new"
    assert r.headers["stream-cursor"].isdigit()


async def test_long_poll_wakes_on_close(client: httpx.AsyncClient) -> None:
    await client.put("/s", headers=TEXT, content=b"x")
    poll = asyncio.create_task(client.get("/s", params={"offset": "now", "live": "long-poll"}))
    await asyncio.sleep(0.05)
    await client.post("/s", headers={"Stream-Closed": "true"})
    r = await asyncio.wait_for(poll, 5)
    assert r.status_code == 204 and r.headers["stream-closed"] == "true"


# -- SSE over a real server -----------------------------------------------------------------


async def test_sse_catch_up_live_and_close(live_client: httpx.AsyncClient) -> None:
    await live_client.put("/s", headers=TEXT, content=b"line1\nline2")
    seen: list[tuple[str, str]] = []
    async with live_client.stream("GET", "/s", params={"offset": "-1", "live": "sse"}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert "no-cache" in response.headers["cache-control"]
        assert "content-length" not in response.headers
        async for event, data in sse_events(response):
            seen.append((event, data))
            if event == "control" and json.loads(data).get("upToDate") and len(seen) == 2:
                await live_client.post("/s", headers={**TEXT, "Stream-Closed": "true"}, content=b"bye")
        # The loop ends because the server closes the connection after the closed control.
    assert [e for e, _ in seen] == ["data", "control", "data", "control"]
    assert seen[0][1] == "line1\nline2" and seen[2][1] == "bye"
    first, last = json.loads(seen[1][1]), json.loads(seen[3][1])
    assert first["upToDate"] is True and first["streamCursor"].isdigit()
    assert last["streamClosed"] is True and "streamCursor" not in last
    assert last["streamNextOffset"] > first["streamNextOffset"]


async def test_sse_binary_is_base64(live_client: httpx.AsyncClient) -> None:
    payload = bytes(range(256))
    await live_client.put(
        "/b", headers={"Content-Type": "application/octet-stream", "Stream-Closed": "true"}, content=payload
    )
    async with live_client.stream("GET", "/b", params={"offset": "-1", "live": "sse"}) as response:
        assert response.headers["stream-sse-data-encoding"] == "base64"
        events = [e async for e in sse_events(response)]
    assert base64.b64decode(events[0][1].replace("\n", "")) == payload
    assert json.loads(events[1][1])["streamClosed"] is True


async def test_sse_now_on_closed_stream_ends_at_once(live_client: httpx.AsyncClient) -> None:
    await live_client.put("/c", headers={**TEXT, "Stream-Closed": "true"}, content=b"old")
    async with live_client.stream("GET", "/c", params={"offset": "now", "live": "sse"}) as response:
        events = [e async for e in sse_events(response)]
    assert len(events) == 1 and events[0][0] == "control"
    assert json.loads(events[0][1]) == {
        "streamNextOffset": "0000000000000000_0000000000000003",
        "streamClosed": True,
        "upToDate": True,
    }


async def test_sse_json_events_are_arrays(live_client: httpx.AsyncClient) -> None:
    await live_client.put("/j", headers={**JSON_CT, "Stream-Closed": "true"}, content=b'[{"n":1},{"n":2}]')
    async with live_client.stream("GET", "/j", params={"offset": "-1", "live": "sse"}) as response:
        assert "stream-sse-data-encoding" not in response.headers
        events = [e async for e in sse_events(response)]
    assert json.loads(events[0][1]) == [{"n": 1}, {"n": 2}]


@pytest.fixture
def short_sse(app_options: dict[str, object]) -> dict[str, object]:
    app_options["sse_max_duration"] = 0.5
    return app_options


async def test_sse_connection_ends_after_its_lifetime(
    short_sse: dict[str, object], live_client: httpx.AsyncClient
) -> None:
    await live_client.put("/s", headers=TEXT, content=b"x")
    async with live_client.stream("GET", "/s", params={"offset": "now", "live": "sse"}) as response:
        events = [e async for e in sse_events(response)]
    assert [e for e, _ in events] == ["control"]


def _sse_scope(path: str) -> dict[str, object]:
    """An ASGI scope for an SSE read from the start, to drive the app without a server."""
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"offset=-1&live=sse",
        "headers": [],
        "scheme": "http",
        "server": ("t", 80),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }


async def test_sse_sends_each_data_event_with_its_control_event_in_one_write(storage: Storage) -> None:
    """Readers that stop at a chunk boundary must never see a data event without its control."""
    app = make_host_app(storage, sse_max_duration=5)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t/v1/stream") as c:
        await c.put("/p", headers={**TEXT, "Stream-Closed": "true"}, content=b"a\r\n\r\nevent: control\r\n\r\nb")
    bodies: list[bytes] = []

    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            bodies.append(message["body"])  # type: ignore[arg-type]

    scope = _sse_scope("/v1/stream/p")
    await asyncio.wait_for(app(scope, receive, send), 10)
    data_chunks = [b for b in bodies if b"event: data" in b]
    assert len(data_chunks) == 1
    assert data_chunks[0].index(b"event: data") < data_chunks[0].index(b"event: control\n")


async def test_parked_sse_readers_get_keepalives_data_and_their_end(storage: Storage) -> None:
    """Idle SSE readers wait without a task of their own, on one shared timer: each still gets its
    keep-alive comments, then what is appended, in order, and the end of its lifetime."""
    from dataclasses import replace

    from durable_streams_asgi.app import durable_streams_app, streams_handler

    app = durable_streams_app(storage, sse_max_duration=1.5)
    handler = streams_handler(app)
    handler.options = replace(handler.options, sse_keepalive=0.2)
    await storage.create("/k", StreamConfig(content_type="text/plain"))
    readers = 50
    bodies: list[list[bytes]] = [[] for _ in range(readers)]
    kept_alive = [asyncio.Event() for _ in range(readers)]

    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)  # the client never leaves: only the lifetime ends the response
        return {"type": "http.disconnect"}

    def sender(i: int) -> Any:
        async def send(message: dict[str, object]) -> None:
            body = message.get("body", b"")
            if body:
                bodies[i].append(body)  # type: ignore[arg-type]
                if body == b": keep-alive\n\n":
                    kept_alive[i].set()

        return send

    scope = {**_sse_scope("/k"), "query_string": b"offset=now&live=sse"}  # the app unmounted
    responses = [asyncio.ensure_future(app(dict(scope), receive, sender(i))) for i in range(readers)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in kept_alive)), 10)
    await storage.append("/k", AppendRequest(content_type="text/plain", items=[b"after the keep-alives"]))
    done, _ = await asyncio.wait(responses, timeout=10)
    assert len(done) == readers, "a response outlived its lifetime"
    for chunks in bodies:
        text = b"".join(chunks)
        assert text.index(b": keep-alive") < text.index(b"data:after the keep-alives")
        assert text.count(b"event: data") == 1


async def test_an_sse_response_ends_when_its_client_leaves(storage: Storage) -> None:
    """Servers drop sends to a departed client silently: only receive() tells, and the response
    (with its watch and writer) must then end, not idle on until its lifetime runs out."""
    from dataclasses import replace

    from starlette.applications import Starlette
    from starlette.routing import Mount

    from durable_streams_asgi.app import durable_streams_app, streams_handler

    streams = durable_streams_app(storage, sse_max_duration=3600)
    handler = streams_handler(streams)
    # No keep-alive within the test's time either: only the departure may end the response.
    handler.options = replace(handler.options, sse_keepalive=3600)
    app = Starlette(routes=[Mount("/v1/stream", app=streams)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t/v1/stream") as c:
        await c.put("/left", headers=TEXT, content=b"x")
    caught_up = asyncio.Event()
    leave = asyncio.Event()

    async def receive() -> dict[str, object]:
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        if b"upToDate" in message.get("body", b""):  # type: ignore[operator]
            caught_up.set()

    scope = _sse_scope("/v1/stream/left")
    before = asyncio.all_tasks()
    response = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.wait_for(caught_up.wait(), 10)
    leave.set()
    done, _ = await asyncio.wait({response}, timeout=10)  # (wait_for would cancel it on timeout)
    assert response in done, "the response outlived its client"
    response.result()  # returned normally: a client leaving is no error
    left = [t.get_coro() for t in asyncio.all_tasks() - before if not t.done()]
    # (A Redis backend's per-process notifier tasks stay, by design.)
    assert not [c for c in left if getattr(c, "__qualname__", "") == "SSESession._pump"]


@pytest.mark.parametrize(
    "query",
    [
        "offset=-1&live=sse",
        "offset=&x",
        "a=1&a=2",
        "offset=now&live=long-poll&cursor=123",
        "",
        "k",
        "=v",
        "a=b=c",
        "x&&y=1",
        "offset=0000000000000000_0000000000000001%20",
        "a=%2F&b=c+d",
        "a=1;b=2",
    ],
)
def test_query_parsing_matches_the_standard_library(query: str) -> None:
    from urllib.parse import parse_qsl

    from durable_streams_asgi.handlers import _Request

    request = _Request({"method": "GET", "headers": [], "query_string": query.encode()}, None, "/")  # type: ignore[arg-type]
    assert request.query == dict(parse_qsl(query, keep_blank_values=True))


async def test_sse_never_splits_a_character_across_appends(live_client: httpx.AsyncClient) -> None:
    """A UTF-8 character split across two appends reaches an SSE reader of a text stream whole,
    once, and each control event's offset counts exactly the bytes delivered before it."""
    await live_client.put("/u", headers=TEXT, content=b"a" + "é".encode()[:1])
    events: list[tuple[str, str]] = []
    async with live_client.stream("GET", "/u", params={"offset": "-1", "live": "sse"}) as response:
        async for event, data in sse_events(response):
            events.append((event, data))
            if event == "control" and len(events) == 2:
                # The reader has "a" (the half character is held back): now the other half.
                await live_client.post("/u", headers={**TEXT, "Stream-Closed": "true"}, content="é".encode()[1:] + b"!")
    texts = [data for event, data in events if event == "data"]
    controls = [json.loads(data) for event, data in events if event == "control"]
    assert texts == ["a", "é!"] and "\ufffd" not in "".join(texts)
    # Offsets: after "a" (1 byte), then after everything (4 bytes); a catch-up read agrees.
    first = await live_client.get("/u", params={"offset": "-1"})
    assert first.content == "aé!".encode()
    after_a = await live_client.get("/u", params={"offset": controls[0]["streamNextOffset"]})
    assert after_a.content == "é!".encode()
    assert controls[-1]["streamClosed"] and controls[-1]["streamNextOffset"] == first.headers["stream-next-offset"]
