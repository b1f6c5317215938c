"""The standalone server's leaner uvicorn protocol: its stand-ins behave like what they replace,
and a real server on it handles pipelining, back-pressure and live reads. And where the lean
protocol is not used (a uvicorn outside the checked range, or missing what it relies on), the
server still serves, on uvicorn's own protocol, and says why."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from durable_streams_asgi import cli, uvicorn_protocol
from durable_streams_asgi.storage.memory import MemoryStorage
from durable_streams_asgi.uvicorn_protocol import (
    _TESTED,
    SUPPORTED_UVICORN,
    LeanHttpToolsProtocol,
    _missing_internals,
    _Signal,
    lean_protocol,
    lean_protocol_status,
)

from .conftest import free_port, running_server, spawn, sse_events, stop

TEXT = {"Content-Type": "text/plain"}


def in_checked_range(version: str) -> bool:
    """Whether ``version`` is inside SUPPORTED_UVICORN (read here independently of the module)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and _TESTED[0] <= (int(match[1]), int(match[2])) < _TESTED[1]


def skip_unless_lean() -> None:
    """For tests of the lean protocol itself: on a uvicorn it is not used with, they test nothing
    the server does (the checks below say whether that uvicorn should have had it)."""
    protocol, why = lean_protocol_status()
    if protocol is None:
        pytest.skip(why)


def test_the_supported_range_is_one_range() -> None:
    low, high = _TESTED
    assert SUPPORTED_UVICORN == f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"


def test_the_cli_uses_the_lean_protocol_exactly_where_this_uvicorn_was_checked() -> None:
    """Inside the range, the lean protocol (and its client limits) must be on; outside it, off,
    with a warning that says which uvicorn, what is lost, and what to do."""
    protocol, why = lean_protocol_status()
    if in_checked_range(uvicorn.__version__):
        assert protocol is LeanHttpToolsProtocol, why
        assert lean_protocol() is LeanHttpToolsProtocol
        assert cli._http_protocol() is LeanHttpToolsProtocol
    else:
        assert protocol is None and lean_protocol() is None
        assert cli._http_protocol() == "auto"
        assert f"uvicorn {uvicorn.__version__}" in why and "--head-timeout" in why
        assert f"pip install 'uvicorn{SUPPORTED_UVICORN}'" in why


def test_the_uvicorn_internals_the_lean_protocol_relies_on_are_there() -> None:
    """What a new uvicorn release inside the range would break first: the methods overridden, what
    FlowControl's constructor sets (the stand-in sets the same without calling it), and the methods
    uvicorn's source calls on the queues the stand-ins replace. Each failure names the attribute."""
    missing = _missing_internals()
    if not in_checked_range(uvicorn.__version__):
        found = "; ".join(missing) or "none missing: worth checking the range against this release"
        pytest.skip(f"uvicorn {uvicorn.__version__} is outside {SUPPORTED_UVICORN}; internals: {found}")
    assert not missing, f"uvicorn {uvicorn.__version__} lacks: " + "; ".join(missing)
    # What only a connection has is checked on the first one: a request through the lean server
    # (below) leaves the lean parts on, which test_the_app_serves_on_every_protocol_the_cli_may_pick
    # asserts after its requests.


def test_an_unchecked_uvicorn_gets_its_own_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    above = f"{_TESTED[1][0]}.{_TESTED[1][1]}.0"  # the first release not checked
    for version in ("0.29.0", above, "0.99.1", "1.0.0", "dev"):
        monkeypatch.setattr(uvicorn, "__version__", version)
        protocol, why = lean_protocol_status()
        assert protocol is None and lean_protocol() is None, version
        assert cli._http_protocol() == "auto"
        assert repr(version) in why if version == "dev" else f"uvicorn {version} " in why
        for limit in ("--head-timeout", "--body-timeout", "--max-head-size"):
            assert limit in why
        assert f"pip install 'uvicorn{SUPPORTED_UVICORN}'" in why and "upgrade durable-streams-asgi" in why


def test_missing_internals_within_the_range_turn_the_lean_protocol_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uvicorn, "__version__", f"{_TESTED[0][0]}.{_TESTED[0][1]}.0")
    monkeypatch.setattr(uvicorn_protocol, "_missing_internals", lambda: ("HttpToolsProtocol.on_response_complete()",))
    protocol, why = lean_protocol_status()
    assert protocol is None and cli._http_protocol() == "auto"
    assert "lacks what it relies on: HttpToolsProtocol.on_response_complete()" in why


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(
    "broken",
    [
        "_missing_internals",  # what is checked without a server, where the status was not asked
        "_PROTOCOL_ATTRIBUTES",  # what only a connection has
        "_CYCLE_ATTRIBUTES",  # what only a request cycle has: found mid-request, on the first one
    ],
)
async def test_a_lean_server_missing_an_internal_serves_as_uvicorns_own(
    broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handed the lean class directly (as running_server is), it still checks on first use, and
    on finding something missing goes on as uvicorn's protocol: one warning, no failed request."""
    skip_unless_lean()
    if broken == "_missing_internals":
        monkeypatch.setattr(uvicorn_protocol, broken, lambda: ("FlowControl.no_such_attribute",))
    else:
        monkeypatch.setattr(uvicorn_protocol, broken, (*getattr(uvicorn_protocol, broken), "no_such_attribute"))
    for flag in ("off_reason", "_checked_connection", "_checked_cycle"):  # a fresh process's (and restored after)
        monkeypatch.setattr(LeanHttpToolsProtocol, flag, None if flag == "off_reason" else False)
    records, logger = _Records(), logging.getLogger("uvicorn.error")
    app = cli.build_app(MemoryStorage(), long_poll_timeout=5, sse_max_duration=5)
    async with running_server(app, http=LeanHttpToolsProtocol) as url:
        logger.addHandler(records)  # now: starting, uvicorn configures its loggers afresh
        try:
            await exercise(url)
            # And the next connections are uvicorn's too (a 200 KiB head is no 431 of ours).
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/healthz", headers={"X-Big": "a" * 200_000})).status_code == 200
        finally:
            logger.removeHandler(records)
    assert LeanHttpToolsProtocol.off_reason is not None and "no_such_attribute" in LeanHttpToolsProtocol.off_reason
    warnings = [m for m in records.messages if "lean HTTP protocol is off" in m]
    assert len(warnings) == 1 and "no_such_attribute" in warnings[0] and "--max-head-size" in warnings[0]
    assert lean_protocol_status()[0] is None  # and the process's status says so


async def exercise(url: str) -> None:
    """What a client of the standalone server does: health check, create, append, catch-up,
    long-poll woken by an append, and SSE tailing an append."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        assert (await client.get("/healthz")).text == "ok"
        streams = f"{url}/v1/stream"
        r = await client.put(f"{streams}/s", headers=TEXT, content=b"hello ")
        assert r.status_code == 201
        r = await client.post(f"{streams}/s", headers=TEXT, content=b"world")
        assert r.status_code == 204
        tail = r.headers["stream-next-offset"]
        r = await client.get(f"{streams}/s", params={"offset": "-1"})
        assert (r.status_code, r.content, r.headers["stream-next-offset"]) == (200, b"hello world", tail)

        poll = asyncio.create_task(client.get(f"{streams}/s", params={"offset": tail, "live": "long-poll"}))
        await asyncio.sleep(0.2)
        assert not poll.done()  # waiting for data
        await client.post(f"{streams}/s", headers=TEXT, content=b"!")
        r = await poll
        assert (r.status_code, r.content) == (200, b"!")
        tail = r.headers["stream-next-offset"]

        seen: list[tuple[str, str]] = []
        params = {"offset": tail, "live": "sse"}
        async with client.stream("GET", f"{streams}/s", params=params) as response:
            assert response.headers["content-type"] == "text/event-stream"
            async for event, data in sse_events(response):
                seen.append((event, data))
                if event == "control" and len(seen) == 1:  # caught up: now something to tail
                    await client.post(f"{streams}/s", headers={**TEXT, "Stream-Closed": "true"}, content=b"bye")
        # The stream's close ends the SSE response.
    assert [e for e, _ in seen] == ["control", "data", "control"]
    assert seen[1][1] == "bye" and json.loads(seen[2][1])["streamClosed"] is True


# What _http_protocol may hand uvicorn: the lean class, or "auto", which is httptools where the
# 'fast' extra is installed and h11 where not.
PROTOCOLS: dict[str, Any] = {"lean": LeanHttpToolsProtocol, "httptools": "httptools", "h11": "h11"}


@pytest.mark.parametrize("http", list(PROTOCOLS))
async def test_the_app_serves_on_every_protocol_the_cli_may_pick(http: str) -> None:
    if http == "lean":
        skip_unless_lean()
    app = cli.build_app(MemoryStorage(), long_poll_timeout=5, sse_max_duration=5)
    async with running_server(app, http=PROTOCOLS[http]) as url:
        await exercise(url)
    if http == "lean":  # what only a live connection and request show was there
        assert LeanHttpToolsProtocol.off_reason is None


# The CLI as it runs where uvicorn is a release the lean protocol was not checked against.
NEWER_UVICORN = """\
import sys

import uvicorn

uvicorn.__version__ = "0.99.0"

from durable_streams_asgi.cli import main

sys.exit(main())
"""


def test_the_cli_on_an_unchecked_uvicorn_serves_on_uvicorns_protocol(tmp_path: Path) -> None:
    """The fallback end to end: the real CLI, its flags and uvicorn's own protocol."""
    (tmp_path / "newer_uvicorn.py").write_text(NEWER_UVICORN)
    port = free_port()
    args = ["newer_uvicorn", "serve", "--port", str(port), "--log-level", "warning"]
    args += ["--head-timeout", "1", "--body-timeout", "1", "--max-head-size", "4096", "--long-poll-timeout", "5"]
    # python -m finds newer_uvicorn in its working directory; the package is installed.
    process = spawn(args, tmp_path / "server.log", f"http://127.0.0.1:{port}/healthz", cwd=tmp_path)
    try:
        asyncio.run(exercise(f"http://127.0.0.1:{port}"))
        # uvicorn's own protocol: the head-size limit the warning says is lost is indeed not there.
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"X-Big": "a" * 8000})
        assert r.status_code == 200
    finally:
        stop(process)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


async def test_signal_behaves_like_an_asyncio_event() -> None:
    signal = _Signal()
    assert not signal.is_set()
    waiters = [asyncio.ensure_future(signal.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # one waiter leaving does not disturb the others
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters[1:])
    signal.set()
    assert await asyncio.gather(*waiters[1:]) == [True, True]
    assert signal.is_set() and await signal.wait()  # stays set until cleared
    signal.clear()
    late = asyncio.ensure_future(signal.wait())
    await asyncio.sleep(0)
    assert not late.done()
    signal.set()
    assert await late


@contextlib.asynccontextmanager
async def lean_server() -> AsyncIterator[int]:
    skip_unless_lean()
    app = cli.build_app(MemoryStorage(), long_poll_timeout=5)
    async with running_server(app, http=LeanHttpToolsProtocol) as url:
        yield int(url.rsplit(":", 1)[1])


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers, body


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with lean_server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        put = b"PUT /v1/stream/p HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\na"
        posts = b"".join(
            b"POST /v1/stream/p HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\n%d" % i
            for i in range(5)
        )
        get = b"GET /v1/stream/p?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n"
        writer.write(put + posts + get)  # one write: the server sees them pipelined
        statuses = [(await _response(reader))[0] for _ in range(6)]
        status, _, body = await _response(reader)
        writer.close()
    assert statuses == [201, 204, 204, 204, 204, 204]
    assert (status, body) == (200, b"a01234")


async def test_a_slow_reader_gets_a_large_response_whole() -> None:
    """Back-pressure: the server's writes outrun a client that reads slowly; flow control pauses
    and resumes the response (through the lean "writable" signal) and nothing is lost."""
    payload = os.urandom(3 << 20)
    async with lean_server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"PUT /v1/stream/big HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload
        )
        assert (await _response(reader))[0] == 201
        writer.close()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: writes back up
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        writer.write(b"GET /v1/stream/big?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = bytearray()
        while len(body) < length:
            body += await reader.read(4096)
        writer.close()
    assert bytes(body) == payload


class _Recorder:
    """Stands in for the socket transport under _Coalescing: records what reaches it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


async def test_a_response_head_goes_out_with_its_body() -> None:
    from durable_streams_asgi.uvicorn_protocol import _JOIN_LIMIT, _Coalescing

    loop = asyncio.get_running_loop()
    raw = _Recorder()
    transport = _Coalescing(raw, loop)  # type: ignore[arg-type]
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    transport.write(head)
    assert raw.writes == []
    transport.write(b"hi")
    assert raw.writes == [head + b"hi"]  # one system call, one packet
    # Bodiless responses go at once; a head whose body never comes goes by the end of the pass.
    transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert raw.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    # A large body is not copied behind its head.
    big = b"x" * (_JOIN_LIMIT + 1)
    transport.write(head)
    transport.write(big)
    assert raw.writes[-2:] == [head, big]
    # Closing sends what is held first; everything else is the real transport's.
    transport.write(head)
    transport.close()
    assert raw.writes[-1] == head and raw.closed
    assert transport.get_extra_info("peername") == "extra:peername"


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[int]:
    """The standalone server (the CLI, so the lean protocol and its limits) with short limits."""
    port = free_port()
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-level", "warning"]
    args += ["--head-timeout", "1", "--body-timeout", "1", "--max-head-size", "4096", "--limit-concurrency", "4"]
    process = spawn(args, tmp_path / "server.log", f"http://127.0.0.1:{port}/healthz")
    try:
        yield port
    finally:
        stop(process)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def exchange(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data``, then read until the server closes the connection: what it said, and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait)
        if data:
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            raise AssertionError(f"still open after {wait} s; got {received[:200]!r}") from None
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def test_slow_and_oversized_clients_are_cut_off(strict_server: int) -> None:
    skip_unless_lean()  # the lean protocol's limits (the CLI warns where they are off)
    port = strict_server
    # Half a request head, then nothing: 408 once the head time is up, and closed.
    answer, took = exchange(port, b"GET /v1/stream/x HTTP/1.1\r\nHost: a\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ") and took < 4
    # Connected and silent: closed too.
    answer, took = exchange(port, b"")
    assert answer.startswith(b"HTTP/1.1 408 ") and took < 4
    # A head larger than allowed: 431 at once, however it goes on.
    answer, took = exchange(port, b"GET /v1/stream/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 8000 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and took < 1
    # A body that does not come: the connection is closed (the request's handler sees it leave).
    head = b"PUT /v1/stream/slow HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nab"
    answer, took = exchange(port, head)
    assert took < 4 and b" 201 " not in answer
    # Ordinary requests on a kept-alive connection are untouched, and the slow PUT wrote nothing.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1/stream") as client:
        assert client.put("/ok", headers={"Content-Type": "text/plain"}, content=b"x").status_code == 201
        assert client.get("/ok", params={"offset": "-1"}).content == b"x"
        assert client.head("/slow").status_code == 404


def test_each_request_on_a_kept_alive_connection_gets_its_own_head_time(strict_server: int) -> None:
    """The head clock starts at each request's first byte: a second request that begins late on
    a kept-alive connection is neither cut off by the first request's clock nor let go past its
    own (the timer is not moved per request, so it must re-arm for the later deadline)."""
    skip_unless_lean()
    port = strict_server  # head timeout 1 s
    request = b"HEAD /v1/stream/none HTTP/1.1\r\nHost: a\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        for _ in range(2):  # two whole requests, answered, within the connection's first second
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
        time.sleep(0.6)  # the client's own pace (not a synchronisation): past half the head time
        began = time.monotonic()
        sock.sendall(b"GET /v1/stream/x HTTP/1.1\r\nHost: a\r\n")  # half a head, then nothing
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        took = time.monotonic() - began
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert 0.9 <= took < 3, took  # its own second, not what was left of the first request's


def test_a_large_body_in_the_read_that_ends_its_head_is_no_431(strict_server: int) -> None:
    """Only head bytes count toward max_head_size: a request whose head and body (past the head
    limit) arrive in one read is served, and so is a second request in the same read."""
    skip_unless_lean()
    port = strict_server
    body = b"x" * 20000  # five times the 4096-byte head limit of strict_server
    put = b"PUT /v1/stream/big HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
    post = b"POST /v1/stream/big HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n"
    post += b"Content-Length: %d\r\n\r\n" % len(body)
    last = b"GET /v1/stream/big?offset=-1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer, _ = exchange(port, put + post + body + last)
    statuses = [line.split(b" ")[1] for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses == [b"201", b"204", b"200"], answer[:300]
    assert answer.endswith(body)


def test_connections_past_the_limit_get_503(strict_server: int) -> None:
    """uvicorn's limit_concurrency, which the CLI sets: SSE readers hold places until none is left."""
    port = strict_server
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1/stream", timeout=10) as client:
        client.put("/live", headers={"Content-Type": "text/plain"})
    readers, answers = [], []
    try:
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", port))
            readers.append(sock)
            sock.sendall(b"GET /v1/stream/live?offset=now&live=sse HTTP/1.1\r\nHost: a\r\n\r\n")
            sock.settimeout(5)
            answers.append(sock.recv(4096).split(b" ", 2)[1])
    finally:
        for sock in readers:
            sock.close()
    served = answers.index(b"503") if b"503" in answers else len(answers)
    assert served >= 2 and answers[served:] == [b"503"] * (6 - served), answers


def test_the_test_extra_holds_uvicorn_to_the_checked_range() -> None:
    """The main suite runs the lean protocol's tests only if it installs a uvicorn they cover."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"uvicorn{SUPPORTED_UVICORN}"' in pyproject
