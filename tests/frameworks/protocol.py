"""One run of the protocol's core through a real server: ``check_protocol(client, base_url)``.

The same checks run through every framework and mounting shape (tests/test_frameworks.py): writes,
catch-up reads and offset resume, a long-poll woken by an append, SSE (text, binary and JSON),
close, HEAD, DELETE, forks named by the client's own URL, the 4xx answers, CORS, and ``Location``
headers equal to the URL the client used. The deeper protocol tests are in test_http.py and the
upstream conformance suite.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from durable_streams_asgi import DurableStreams, StreamNotFound
from durable_streams_asgi.storage.base import Storage

from ..conftest import sse_events

TEXT = {"Content-Type": "text/plain"}
JSON_CT = {"Content-Type": "application/json"}
BINARY = {"Content-Type": "application/octet-stream"}
CLOSE = {"Stream-Closed": "true"}


class ParkedReaders:
    """Tells a test when a live reader is waiting for data in the storage, so that an append is
    made while the reader is parked (a wake-up) rather than before it arrived (a catch-up)."""

    def __init__(self, storage: Storage) -> None:
        self._armed: dict[str, list[asyncio.Event]] = {}
        wait_for_data = storage.wait_for_data

        async def waiting(path: str, position: int, timeout: float) -> bool:
            for event in self._armed.pop(path, []):
                event.set()
            return await wait_for_data(path, position, timeout)

        storage.wait_for_data = waiting  # type: ignore[method-assign]

    def __call__(self, path: str) -> asyncio.Event:
        """An event set when the next reader of ``path`` starts waiting (arm it before the read)."""
        event = asyncio.Event()
        self._armed.setdefault(path, []).append(event)
        return event


Parked = Callable[[str], asyncio.Event]


async def check_protocol(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    parked: Parked | None = None,
    streams: DurableStreams | None = None,
) -> None:
    """Run the core protocol against the streams served at ``base_url`` (e.g.
    ``http://127.0.0.1:8000/v1/stream``, or a proxy's URL in front of it).

    ``parked`` (a :class:`ParkedReaders`) makes the long-poll check a certain wake-up; ``streams``
    (the in-process API over the same storage) checks that stream paths are the part of the URL
    below ``base_url``, whatever the framework did with the path.
    """
    base = base_url.rstrip("/")
    ns = f"chk-{uuid.uuid4().hex[:10]}"
    stream_base = unquote(urlsplit(base).path)

    def url(path: str) -> str:
        return f"{base}/{ns}/{path}"

    async def exists_in_process(path: str) -> None:
        if streams is not None:
            await streams.head(f"/{ns}/{path}")

    # -- create: 201 with Location = the URL the client used, then idempotent 200, or 409 ------
    r = await client.put(url("text"), headers=TEXT, content=b"hello ")
    assert r.status_code == 201, r.text
    assert r.headers["location"] == url("text")
    assert r.headers["content-type"] == "text/plain"
    created = r.headers["stream-next-offset"]
    assert r.headers["x-content-type-options"] == "nosniff"
    await exists_in_process("text")
    r = await client.put(url("text"), headers=TEXT)
    assert r.status_code == 200 and "location" not in r.headers
    assert (await client.put(url("text"), headers=JSON_CT)).status_code == 409

    # Nested and percent-encoded paths: the stream is the decoded path, Location the encoded URL.
    r = await client.put(url("rooms/a%20b/42"), headers=TEXT)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == url("rooms/a%20b/42")
    await exists_in_process("rooms/a b/42")

    # -- append, catch-up read, offset resume, HEAD ----------------------------------------------
    r = await client.post(url("text"), headers=TEXT, content=b"world")
    assert r.status_code == 204, r.text
    tail = r.headers["stream-next-offset"]
    assert tail > created
    r = await client.get(url("text"), params={"offset": "-1"})
    assert r.status_code == 200 and r.content == b"hello world"
    assert r.headers["stream-up-to-date"] == "true" and r.headers["stream-next-offset"] == tail
    assert "etag" in r.headers
    r = await client.get(url("text"), params={"offset": created})
    assert r.content == b"world" and r.headers["stream-next-offset"] == tail
    r = await client.head(url("text"))
    assert r.status_code == 200 and r.content == b""
    assert r.headers["stream-next-offset"] == tail and r.headers["content-type"] == "text/plain"
    assert "no-store" in r.headers["cache-control"]

    # -- long-poll: parked at the tail, woken by an append ---------------------------------------
    waiting = parked(f"/{ns}/text") if parked is not None else None
    poll = asyncio.create_task(client.get(url("text"), params={"offset": tail, "live": "long-poll"}))
    if waiting is not None:
        await asyncio.wait_for(waiting.wait(), 10)
    assert (await client.post(url("text"), headers=TEXT, content=b"!")).status_code == 204
    r = await asyncio.wait_for(poll, 10)
    assert r.status_code == 200 and r.content == b"!"
    assert r.headers["stream-cursor"].isdigit()
    tail = r.headers["stream-next-offset"]

    # -- SSE on a text stream: catch-up, a live append, then close ends the connection ----------
    seen: list[tuple[str, Any]] = []
    async with client.stream("GET", url("text"), params={"offset": created, "live": "sse"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "stream-sse-data-encoding" not in response.headers
        async for event, data in sse_events(response):
            seen.append((event, data if event == "data" else json.loads(data)))
            if len(seen) == 2:  # caught up: the server now waits for data
                assert (await client.post(url("text"), headers=TEXT, content=b" more")).status_code == 204
            elif len(seen) == 4:
                r = await client.post(url("text"), headers=CLOSE)
                assert r.status_code == 204 and r.headers["stream-closed"] == "true"
        # The loop ends because the server ends the response after the closing control event.
    assert [e for e, _ in seen] == ["data", "control", "data", "control", "control"], seen
    assert seen[0][1] == "world!" and seen[2][1] == " more"
    assert seen[1][1]["upToDate"] is True and seen[1][1]["streamNextOffset"] == tail
    assert seen[4][1]["streamClosed"] is True

    # -- closed: appends refused, reads say so ---------------------------------------------------
    r = await client.post(url("text"), headers=TEXT, content=b"late")
    assert r.status_code == 409 and r.headers["stream-closed"] == "true"
    r = await client.get(url("text"), params={"offset": "-1"})
    assert r.content == b"hello world! more" and r.headers["stream-closed"] == "true"

    # -- SSE on a binary stream is base64 ---------------------------------------------------------
    payload = bytes(range(256))
    assert (await client.put(url("bin"), headers={**BINARY, **CLOSE}, content=payload)).status_code == 201
    async with client.stream("GET", url("bin"), params={"offset": "-1", "live": "sse"}) as response:
        assert response.headers["stream-sse-data-encoding"] == "base64"
        events = [e async for e in sse_events(response)]
    assert [e for e, _ in events] == ["data", "control"]
    assert base64.b64decode(events[0][1].replace("\n", "")) == payload
    assert (await client.get(url("bin"))).content == payload

    # -- JSON: messages, arrays flattened, SSE events are arrays, bad JSON is 400 ---------------
    assert (await client.put(url("json"), headers=JSON_CT, content=b'[{"n":1}]')).status_code == 201
    assert (await client.post(url("json"), headers=JSON_CT, content=b'[{"n":2},{"n":3}]')).status_code == 204
    assert (await client.post(url("json"), headers=JSON_CT, content=b"{ nope")).status_code == 400
    assert (await client.get(url("json"))).json() == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert (await client.post(url("json"), headers=CLOSE)).status_code == 204
    async with client.stream("GET", url("json"), params={"offset": "-1", "live": "sse"}) as response:
        events = [e async for e in sse_events(response)]
    assert json.loads(events[0][1]) == [{"n": 1}, {"n": 2}, {"n": 3}]

    # -- a fork names its source by the URL path the client uses --------------------------------
    source = f"{stream_base}/{ns}/json"
    r = await client.put(url("fork"), headers={**JSON_CT, "Stream-Forked-From": source})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == url("fork")
    assert (await client.get(url("fork"))).json() == [{"n": 1}, {"n": 2}, {"n": 3}]
    await exists_in_process("fork")

    # -- DELETE, then 404 everywhere --------------------------------------------------------------
    assert (await client.delete(url("rooms/a%20b/42"))).status_code == 204
    for method in ("GET", "HEAD", "DELETE"):
        assert (await client.request(method, url("rooms/a%20b/42"))).status_code == 404, method
    if streams is not None:
        try:
            await streams.head(f"/{ns}/rooms/a b/42")
        except StreamNotFound:
            pass
        else:
            raise AssertionError("a deleted stream is still there")
    assert (await client.post(url("missing"), headers=TEXT, content=b"x")).status_code == 404
    assert (await client.get(url("missing"), params={"offset": "now", "live": "sse"})).status_code == 404

    # -- 400s, 405 -----------------------------------------------------------------------------------
    assert (await client.put(url("s"), headers=TEXT, content=b"keep")).status_code == 201
    bad: list[tuple[str, str, dict[str, str], bytes, int]] = [
        ("GET", url("s") + "?offset=abc", {}, b"", 400),
        ("GET", url("s") + "?live=long-poll", {}, b"", 400),
        ("POST", url("s"), TEXT, b"", 400),
        ("PUT", url("n"), {**TEXT, "Stream-TTL": "10", "Stream-Expires-At": "2099-01-01T00:00:00Z"}, b"", 400),
        ("PUT", f"{base}/{ns}//n", TEXT, b"", 400),
        ("PATCH", url("s"), TEXT, b"x", 405),
    ]
    for method, target, headers, body, status in bad:
        r = await client.request(method, target, headers=headers, content=body)
        assert r.status_code == status, (method, target, r.status_code, r.text)
        assert len(r.content) < 200
    assert (await client.get(url("s"))).content == b"keep"
    assert (await client.head(url("n"))).status_code == 404

    # -- CORS preflight reaches the streams app ---------------------------------------------------
    r = await client.options(
        url("s"), headers={"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 204
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-origin"] == "*"
