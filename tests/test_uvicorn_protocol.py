"""The standalone server's leaner uvicorn protocol: its stand-ins behave like what they replace,
and a real server on it handles pipelining, back-pressure and live reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from durable_streams_asgi import cli
from durable_streams_asgi.storage.memory import MemoryStorage
from durable_streams_asgi.uvicorn_protocol import LeanHttpToolsProtocol, _Signal, lean_protocol

from .conftest import free_port, running_server, spawn, stop


def test_the_cli_serves_with_the_lean_protocol_on_this_uvicorn() -> None:
    assert lean_protocol() is LeanHttpToolsProtocol
    assert cli._http_protocol() is LeanHttpToolsProtocol


def test_an_unchecked_uvicorn_gets_its_own_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("0.29.0", "0.99.1", "1.0.0", "dev"):
        monkeypatch.setattr(uvicorn, "__version__", version)
        assert lean_protocol() is None, version


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
