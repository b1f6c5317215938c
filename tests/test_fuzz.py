"""Hostile requests, generated (hypothesis): any method, path, protocol header, body, offset and
query string, on every backend. No request gets a 5xx or a traceback, and a canary stream that
no generated request may name stays exactly as it was."""

from __future__ import annotations

import asyncio
import string
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durable_streams_asgi import MemoryStorage
from durable_streams_asgi.storage.base import Storage

from .conftest import make_host_app, unique_prefix

CANARY = "/canary"
CANARY_BODY = b'[{"keep":1},{"keep":2}]'
SEEN: dict[str, int] = {"requests": 0, "5xx": 0}

HEADER_NAMES = [
    *("Content-Type", "Content-Length", "Stream-TTL", "Stream-Expires-At", "Stream-Seq", "Stream-Closed"),
    *("Stream-Forked-From", "Stream-Fork-Offset", "Stream-Fork-Sub-Offset", "Producer-Id", "Producer-Epoch"),
    *("Producer-Seq", "If-None-Match", "Origin", "Cache-Control", "Last-Event-ID", "Transfer-Encoding"),
]
OFFSETS = [
    *("-1", "now", "", "0", "abc", "-2", "_", "9" * 40),
    *("0000000000000000_0000000000000000", "0000000000000000_0000000000000002", "0000000000000000_9999999999999999"),
]
LIVE = ["long-poll", "sse", "", "true", "forever", "SSE"]
NEAR_MISSES = [
    *("application/json", "text/plain", "text/html; charset=utf-8", "", "true", "false", "0", "1", "-1", "1e3"),
    *("99999999999999999999", "2099-01-01T00:00:00Z", "http://[x]/v1/stream/s", "http://[::1/v1/stream/s"),
    *("/v1/stream/s", "/v1/stream/canary", "*", "chunked"),
]

# Values: what each header expects, near misses, and garbage (printable ASCII, as httpx sends).
header_value = st.one_of(
    st.sampled_from(NEAR_MISSES),
    st.sampled_from(NEAR_MISSES),  # twice: near misses find more than garbage does
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.sampled_from(OFFSETS),
)
segment = st.one_of(
    st.sampled_from(["s", "a", "b", "x.y", "..", ".", "%2e%2e", "%00", "%2F", "%ff", "__ds", "é", "😀", "a b"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.~%", min_size=1, max_size=12),
)
path = (
    st.lists(segment, min_size=1, max_size=4)
    .map(lambda parts: "/" + "/".join(parts))
    .filter(lambda p: p.strip("/").lower() != CANARY.strip("/"))
)
query = st.one_of(
    st.just(""),
    st.lists(
        st.one_of(
            st.sampled_from(OFFSETS).map(lambda v: f"offset={v}"),
            st.sampled_from(LIVE).map(lambda v: f"live={v}"),
            st.sampled_from(["1", "abc", "-5", "9" * 30]).map(lambda v: f"cursor={v}"),
        ),
        max_size=3,
    ).map("&".join),
    st.text(alphabet=string.printable, max_size=40),
)
body = st.one_of(
    st.just(b""),
    st.sampled_from([b"[]", b"[1,2]", b"{}", b'{"a":', b"\xff\xfe", b"NaN", b"[" * 2000, b'"\xc3"', b"hello"]),
    st.binary(max_size=200),
)
hostile_request = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "HEAD", "PUT", "PUT", "POST", "POST", "DELETE", "OPTIONS", "PATCH", "BREW"]),
        "path": path,
        "query": query,
        "headers": st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=5),
        "body": body,
    }
)

# One protocol header with a near miss, on an ordinary request: what a fuzzer of all at once
# rarely reaches past the first check that fails.
focused_request = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["PUT", "POST", "GET", "HEAD"]),
        "path": st.sampled_from(["/s", "/n", "/s/t"]),
        "query": st.sampled_from(["", "offset=-1", "offset=now&live=long-poll"]),
        "headers": st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from(NEAR_MISSES)).map(
            lambda pair: {"Content-Type": "text/plain", pair[0]: pair[1]}
        ),
        "body": st.sampled_from([b"", b"x", b"[1]"]),
    }
)


async def run(storage: Storage, requests: list[dict[str, Any]]) -> None:
    app = make_host_app(storage, long_poll_timeout=0.05, sse_max_duration=0.05)
    # An exception the app lets escape is what a real server answers with 500: count it as such.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t/v1/stream", timeout=10) as client:
        made = await client.put(CANARY, headers={"Content-Type": "application/json"}, content=CANARY_BODY)
        assert made.status_code in (200, 201)
        before = (await client.head(CANARY)).headers
        for spec in requests:
            headers = {
                k: v for k, v in spec["headers"].items() if k.lower() not in ("content-length", "transfer-encoding")
            }
            url = spec["path"] + ("?" + spec["query"] if spec["query"] else "")
            try:
                response = await client.request(spec["method"], url, headers=headers, content=spec["body"])
            except httpx.InvalidURL:
                continue  # the client refuses it before it is sent: nothing reached the server
            SEEN["requests"] += 1
            if response.status_code >= 500:
                SEEN["5xx"] += 1
            assert response.status_code < 500, (spec, response.status_code, response.text[:300])
            assert b"Traceback" not in response.content, spec
        after = await client.get(CANARY, params={"offset": "-1"})
        assert after.status_code == 200 and after.content == CANARY_BODY
        assert after.headers["stream-next-offset"] == before["stream-next-offset"]
        assert "stream-closed" not in after.headers


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_hostile_requests_never_get_a_5xx_or_touch_the_canary(backend: str, request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.one_of(hostile_request, focused_request), min_size=5, max_size=25))
    def check(requests: list[dict[str, Any]]) -> None:
        async def main() -> None:
            if redis_url is None:
                storage: Storage = MemoryStorage()
            else:
                from durable_streams_asgi.storage.redis import RedisStorage

                storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
            try:
                await run(storage, requests)
            finally:
                await storage.aclose()

        asyncio.run(main())

    SEEN.update(requests=0, **{"5xx": 0})
    check()
    print(f"fuzz ({backend}): {SEEN['requests']} requests, {SEEN['5xx']} answered 5xx")
    assert SEEN["requests"] > 1000
