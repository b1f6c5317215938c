"""The standalone server's HTTP/1.1 protocol (durable_streams_asgi/http11/): a real server on it
serves the protocol, pipelining, back-pressure, live reads and every HTTP/1.1 corner a client can
reach (100-continue, chunked bodies, HEAD, HTTP/1.0, upgrades, garbage), bounds slow and
oversized clients, keeps applications' mistakes from reaching clients as anything but a 500, and
takes its one-call response path only where nothing wraps ``send``. Where it cannot be used (no
httptools), the CLI serves on uvicorn's own protocol and says what is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from durable_streams_asgi import cli, http11
from durable_streams_asgi.http11 import HTTP11Protocol, protocol_status
from durable_streams_asgi.storage.memory import MemoryStorage

from .conftest import free_port, running_server, spawn, sse_events, stop

TEXT = {"Content-Type": "text/plain"}


def test_the_cli_serves_on_this_protocol() -> None:
    protocol, why = protocol_status()
    assert protocol is HTTP11Protocol, why
    assert cli._http_protocol() is HTTP11Protocol


def test_a_uvicorn_without_what_the_protocol_is_given_gets_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http11, "_STATE_ATTRIBUTES", (*http11._STATE_ATTRIBUTES, "no_such_attribute"))
    protocol, why = protocol_status()
    assert protocol is None and cli._http_protocol() == "auto"
    assert "ServerState.no_such_attribute" in why and f"uvicorn {uvicorn.__version__}" in why
    for limit in ("--head-timeout", "--body-timeout", "--max-head-size"):
        assert limit in why


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


# What _http_protocol may hand uvicorn: this package's protocol, or "auto", which is httptools
# where the 'fast' extra is installed and h11 where not.
PROTOCOLS: dict[str, Any] = {"http11": HTTP11Protocol, "httptools": "httptools", "h11": "h11"}


@pytest.mark.parametrize("http", list(PROTOCOLS))
async def test_the_app_serves_on_every_protocol_the_cli_may_pick(http: str) -> None:
    app = cli.build_app(MemoryStorage(), long_poll_timeout=5, sse_max_duration=5)
    async with running_server(app, http=PROTOCOLS[http]) as url:
        await exercise(url)


# The CLI as it runs where httptools is not installed.
NO_HTTPTOOLS = """\
import sys

sys.modules["httptools"] = None  # import httptools: ImportError

from durable_streams_asgi.cli import main

sys.exit(main())
"""


def test_the_cli_without_httptools_serves_on_uvicorns_protocol(tmp_path: Path) -> None:
    """The fallback end to end: the real CLI, its flags and uvicorn's h11 protocol, with a warning."""
    (tmp_path / "no_httptools.py").write_text(NO_HTTPTOOLS)
    port = free_port()
    args = ["no_httptools", "serve", "--port", str(port), "--log-level", "warning"]
    args += ["--head-timeout", "1", "--body-timeout", "1", "--max-head-size", "4096", "--long-poll-timeout", "5"]
    # python -m finds no_httptools in its working directory; the package is installed.
    process = spawn(args, tmp_path / "server.log", f"http://127.0.0.1:{port}/healthz", cwd=tmp_path)
    try:
        asyncio.run(exercise(f"http://127.0.0.1:{port}"))
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    assert "httptools is not installed" in log and "--max-head-size" in log


@contextlib.asynccontextmanager
async def http11_server(app: Any = None, **config: Any) -> AsyncIterator[int]:
    """``app`` (the streams app by default) served on this protocol in this event loop: its port."""
    if app is None:
        app = cli.build_app(MemoryStorage(), long_poll_timeout=5)
    async with running_server(app, http=HTTP11Protocol, **config) as url:
        yield int(url.rsplit(":", 1)[1])


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers, body


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with http11_server() as port:
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
    async with http11_server() as port:
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


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[int]:
    """The standalone server (the CLI, so this HTTP/1.1 protocol and its limits) with short limits."""
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


async def _talk(port: int, data: bytes, *, reads: int = 1) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send ``data``; read ``reads`` responses, then whether the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answers = [await asyncio.wait_for(_response(reader), 5) for _ in range(reads)]
        try:
            closed = await asyncio.wait_for(reader.read(1), 1) == b""
        except asyncio.TimeoutError:  # (not TimeoutError before Python 3.11)
            closed = False
        return answers, closed
    finally:
        writer.close()


async def test_http_corners_a_client_can_reach() -> None:
    async with http11_server() as port:
        # Expect: 100-continue: the interim answer comes before the body is sent.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /v1/stream/c HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n")
        writer.write(b"Expect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hi")
        assert (await asyncio.wait_for(_response(reader), 5))[0] == 201
        writer.close()
        # A chunked request body.
        chunked = b"POST /v1/stream/c HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n"
        chunked += b"Transfer-Encoding: chunked\r\n\r\n3\r\n, t\r\n4\r\nhere\r\n0\r\n\r\n"
        read = b"GET /v1/stream/c?offset=-1 HTTP/1.1\r\nHost: a\r\n\r\n"
        answers, closed = await _talk(port, chunked + read, reads=2)
        assert [a[0] for a in answers] == [204, 200] and answers[1][2] == b"hi, there" and not closed
        # HEAD: the head only; HTTP/1.0 and "Connection: close": closed after the answer.
        answers, closed = await _talk(port, b"HEAD /v1/stream/c HTTP/1.1\r\nHost: a\r\n\r\n" + read)
        assert answers[0][0] == 200 and answers[0][2] == b"" and not closed
        answers, closed = await _talk(port, b"GET /v1/stream/c?offset=-1 HTTP/1.0\r\n\r\n")
        assert answers[0][2] == b"hi, there" and closed
        answers, closed = await _talk(port, read.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert answers[0][0] == 200 and answers[0][1]["connection"] == "close" and closed
        # An upgrade we do not speak: answered as plain HTTP, then the connection closes.
        upgrade = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        answers, closed = await _talk(port, upgrade)
        assert answers[0][:1] == (200,) and answers[0][2] == b"ok" and closed
        # Garbage: 400, closed, and nothing of the server's insides.
        answers, closed = await _talk(port, b"GET / HTTP/1.1\r\nHost a\r\n\r\n")
        assert answers[0][0] == 400 and b"Traceback" not in answers[0][2] and closed
        # Percent-encoded paths and query strings reach the app decoded as ASGI says.
        answers, _ = await _talk(port, b"HEAD /v1/stream/%63 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answers[0][0] == 200


async def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_time() -> None:
    async with http11_server(timeout_keep_alive=0.3) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(_response(reader), 5))[0] == 200
        began = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # the server closed it
        assert 0.2 < time.monotonic() - began < 3
        writer.close()


async def _failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An application with every mistake the protocol must keep from the client."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/raises":
        raise ValueError("secret detail")
    if path == "/cancelled":  # raised by the application, not a cancellation of its task
        raise asyncio.CancelledError("secret detail")
    if path == "/bad-header":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-evil", b"a\r\nset-cookie: b")]})
    elif path == "/silent":
        return
    elif path == "/short":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"ab"})
    elif path == "/disconnect":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"open", "more_body": True})
        message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
        scope["state"]["gone"].set()


async def test_application_mistakes_become_a_500_and_no_detail_leaks() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    async with http11_server(_failing) as port:
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            paths = [b"/raises", b"/bad-header", b"/silent"]
            if hasattr(asyncio.Task, "cancelling"):  # (Python 3.11+: before, it passes for a cancellation)
                paths.append(b"/cancelled")
            for path in paths:
                answers, closed = await _talk(port, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
                status, _, body = answers[0]
                assert (status, body, closed) == (500, b"Internal Server Error", True), path
            # A response cut short after its head: the connection closes (the client sees it).
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /short HTTP/1.1\r\nHost: a\r\n\r\n")
            received = await asyncio.wait_for(reader.read(), 5)
            assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"\r\n\r\nab")
            writer.close()
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert any("secret detail" in str(r.exc_info) for r in records)  # it went to the log


async def test_a_header_name_once_checked_still_has_every_value_checked() -> None:
    """Names are checked once and remembered, values every time: a good value and then a bad one
    under the same name (a plain header, and one whose lines are never remembered) is a 500 the
    second time; a bad name is never remembered as checked."""
    values = iter([b"fine", b"a\r\nset-cookie: b", b"fine", b"a\nb"])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        name = {"/plain": b"x-thing", "/varying": b"etag", "/bad-name": b"x thing"}[scope["path"]]
        value = b"fine" if name == b"x thing" else next(values)
        await send({"type": "http.response.start", "status": 200, "headers": [(name, value)]})
        await send({"type": "http.response.body", "body": b"ok"})

    async with http11_server(app) as port:
        for path, statuses in ((b"/plain", (200, 500)), (b"/varying", (200, 500)), (b"/bad-name", (500, 500))):
            for expected in statuses:
                answers, _ = await _talk(port, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
                assert answers[0][0] == expected, path


async def test_proxy_headers_mean_what_uvicorn_says_and_requests_without_them_skip_its_middleware() -> None:
    """uvicorn's ProxyHeadersMiddleware still decides what X-Forwarded-For and -Proto mean; the
    protocol hands it only the requests that carry one (it leaves every other scope alone), on
    the same kept-alive connection too, and a peer that is not trusted changes nothing."""
    seen: list[tuple[Any, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append((scope["client"][0], scope["scheme"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def get(*headers: bytes) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"

    requests = (
        get(b"X-Forwarded-For: 203.0.113.9, 127.0.0.1", b"X-Forwarded-Proto: https")
        + get()
        + get(b"x-forwarded-proto: https")
        + get(b"X-Forwarded-For: 198.51.100.7")
    )
    async with http11_server(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as port:
        answers, _ = await _talk(port, requests, reads=4)
    assert [status for status, _, _ in answers] == [204] * 4
    assert seen == [("203.0.113.9", "https"), ("127.0.0.1", "http"), ("127.0.0.1", "https"), ("198.51.100.7", "http")]
    seen.clear()
    async with http11_server(app, proxy_headers=True, forwarded_allow_ips="192.0.2.1") as port:
        await _talk(port, requests, reads=4)
    assert seen == [("127.0.0.1", "http")] * 4
    seen.clear()
    async with http11_server(app, proxy_headers=False) as port:
        await _talk(port, requests, reads=4)
    assert seen == [("127.0.0.1", "http")] * 4


async def test_the_application_learns_that_its_client_left() -> None:
    gone = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["state"]["gone"] = gone
        await _failing(scope, receive, send)

    async with http11_server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /disconnect HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"open"), 5)
        writer.close()
        await asyncio.wait_for(gone.wait(), 5)


async def test_a_middleware_that_wraps_send_sees_every_response() -> None:
    """Our handler answers in one call only where send is the protocol's own: behind a
    middleware that wraps send, it goes through the messages, so the middleware sees them."""
    streams = cli.build_app(MemoryStorage(), long_poll_timeout=5)
    seen: list[int] = []

    async def tagging(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen.append(message["status"])
                message = {**message, "headers": [*message["headers"], (b"x-tagged", b"yes")]}
            await send(message)

        await streams(scope, receive, tagged)

    async with http11_server(tagging) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1/stream") as client:
            r = await client.put("/m", headers=TEXT, content=b"x")
            assert r.status_code == 201 and r.headers["x-tagged"] == "yes"
            r = await client.get("/m", params={"offset": "-1"})
            assert r.content == b"x" and r.headers["x-tagged"] == "yes"
    assert seen == [201, 200]


def test_the_access_log_names_each_request(tmp_path: Path) -> None:
    port = free_port()
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-level", "info"]
    process = spawn(args, tmp_path / "server.log", f"http://127.0.0.1:{port}/healthz")
    try:
        httpx.put(f"http://127.0.0.1:{port}/v1/stream/logged?x=1", headers=TEXT)
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text()
    assert '"PUT /v1/stream/logged?x=1 HTTP/1.1" 201' in log, log


async def test_a_limit_reached_mid_response_closes_without_writing_into_it() -> None:
    """A pipelined head too large while an SSE response streams: the connection closes, and
    no 431 lands inside the event stream."""
    async with http11_server() as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1/stream") as client:
            await client.put("/sse", headers=TEXT, content=b"a")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/stream/sse?offset=-1&live=sse HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"event: control"), 5)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000)  # never ends
        rest = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
    assert b"HTTP/1.1 431" not in rest


async def _reviewed(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An application for the cases an outside review found: slow answers, echoes, big bodies."""
    if scope["type"] != "http":
        return
    path, state = scope["path"], scope["state"]
    state.setdefault("calls", []).append(path)
    body = b""
    if path == "/slow":
        await asyncio.sleep(1.5)  # (the application's own pace: longer than the limits below)
    elif path == "/echo":
        message = await receive()
        body = message["body"]
        while message.get("more_body"):
            message = await receive()
            body += message["body"]
    elif path == "/two-receives":  # two tasks wait on receive() at once
        both = {asyncio.ensure_future(receive()), asyncio.ensure_future(receive())}
        done, rest = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        body = b"".join(task.result().get("body", b"") for task in done)  # (both may wake at once)
        state["watcher"] = (rest or done).pop()
    elif path == "/gives-up":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"y" * (1 << 20)
        for _ in range(8):  # the client does not read: a send times out, the application goes on
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(send({"type": "http.response.body", "body": chunk, "more_body": True}), 0.2)
        state["sent"].set()
        await send({"type": "http.response.body", "body": b""})
        state["after"] = "ended"
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _limits(monkeypatch: pytest.MonkeyPatch, **values: float) -> None:
    monkeypatch.setattr(http11.connection, "_limits", http11.ClientLimits(**values))


async def test_a_pipelined_request_waiting_its_turn_is_not_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its head and body clocks stop while the server does not read (review finding 1)."""
    _limits(monkeypatch, head_timeout=0.5, body_timeout=0.5)
    async with http11_server(_reviewed, lifespan="on") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345"
        )
        await writer.drain()
        first = await asyncio.wait_for(_response(reader), 5)
        writer.write(b"67890")
        second = await asyncio.wait_for(_response(reader), 5)
        writer.close()
    assert first[0] == 200 and (second[0], second[2]) == (200, b"1234567890")


async def test_a_head_too_large_is_refused_even_in_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that arrives whole in one read is measured too (review finding 3)."""
    _limits(monkeypatch, max_head_size=4096)
    async with http11_server(_reviewed) as port:
        answers, closed = await _talk(port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n")
        assert answers[0][0] == 431 and closed
        answers, _ = await _talk(port, b"GET /x HTTP/1.1\r\nHost: a\r\nX-Ok: " + b"a" * 3000 + b"\r\n\r\n")
        assert answers[0][0] == 200


async def test_an_application_that_gives_up_on_a_send_can_send_again() -> None:
    """Review finding 4: a timed-out send must not cancel what later sends wait on."""
    state: dict[str, Any] = {"sent": asyncio.Event()}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["state"] = state
        await _reviewed(scope, receive, send)

    async with http11_server(app) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /gives-up HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(state["sent"].wait(), 10)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        received = await asyncio.wait_for(reader.read(), 10)  # now read all, to the end
        writer.close()
    assert state.get("after") == "ended" and received.endswith(b"0\r\n\r\n")


async def test_two_receives_at_once_both_return() -> None:
    """Review finding 5: both wake (the one that did not get the body, once the response ends)."""
    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope["state"] = state
        await _reviewed(scope, receive, send)

    async with http11_server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /two-receives HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the client's own pace: both receive() calls wait for the body
        writer.write(b"hi")
        assert (await asyncio.wait_for(_response(reader), 5))[2] == b"hi"
        writer.close()
        assert (await asyncio.wait_for(state["watcher"], 5))["type"] in ("http.request", "http.disconnect")


async def test_pipelined_reads_wait_for_a_client_that_does_not_read() -> None:
    """Review finding 6: a client pipelining reads of a large stream and reading none of the
    answers gets no more answered than its socket holds, rather than every one buffered in
    memory (our handler answers in one call, which does not wait for the socket itself)."""
    streams = cli.build_app(MemoryStorage(), long_poll_timeout=5)
    calls: list[str] = []

    async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
        calls.append(scope.get("method", ""))
        await streams(scope, receive, send)  # send passed through: the one-call path is taken

    size = 3 << 20
    async with http11_server(counting) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1/stream") as client:
            put = await client.put("/big", headers={"Content-Type": "application/octet-stream"}, content=b"x" * size)
            assert put.status_code == 201
        calls.clear()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /v1/stream/big?offset=-1 HTTP/1.1\r\nHost: a\r\n\r\n" * 30)
        await asyncio.sleep(1)  # the client's own pace: it reads nothing for a second
        answered_while_blocked = len(calls)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 23)
        for _ in range(30):
            status, _, body = await asyncio.wait_for(_response(reader), 30)
            assert status == 200 and len(body) == size
        writer.close()
    assert answered_while_blocked <= 2, answered_while_blocked
    assert len(calls) == 30


async def test_a_request_asking_for_h2c_keeps_its_body() -> None:
    """Review finding 7: curl --http2 on http:// sends "Upgrade: h2c"; the body must arrive."""
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    async with http11_server() as port:
        put = b"PUT /v1/stream/h2 HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n" + upgrade
        answers, closed = await _talk(port, put + b"Content-Length: 12\r\n\r\ninitial data")
        assert answers[0][0] == 201 and closed
        # The body in a later read than its head.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/stream/h2 HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n" + upgrade)
        writer.write(b"Content-Length: 5\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b", two")
        assert (await asyncio.wait_for(_response(reader), 5))[0] == 204
        writer.close()
        answers, _ = await _talk(port, b"GET /v1/stream/h2?offset=-1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answers[0][2] == b"initial data, two"
        # Chunked, with an upgrade: refused, and nothing written.
        chunked = b"POST /v1/stream/h2 HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n" + upgrade
        answers, closed = await _talk(port, chunked + b"Transfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n0\r\n\r\n")
        assert answers[0][0] == 400 and closed
        answers, _ = await _talk(port, b"GET /v1/stream/h2?offset=-1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert answers[0][2] == b"initial data, two"


async def test_an_answer_before_100_continue_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 8: the client may or may not send the body it was not asked for, so the
    connection cannot carry another request: closed after the answer, and no stray 408."""
    _limits(monkeypatch, body_timeout=0.5)
    async with http11_server(_reviewed) as port:  # /x answers without reading the body
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n")
        status, headers, _ = await asyncio.wait_for(_response(reader), 5)
        rest = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
    assert (status, headers["connection"], rest) == (200, "close", b"")
