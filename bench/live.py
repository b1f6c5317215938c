"""Live-reader load for the benchmark: SSE and long-poll readers, writers, idle connections.

Raw HTTP/1.1 over asyncio streams (no client library), so that the client's own overhead is small
and the same for every server. Messages carry their send time: each appended line is
``<seq>:<time.time_ns()>``, and a reader's latency for a line is its receive time minus that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Endpoint:
    host: str
    port: int
    prefix: str  # e.g. "/v1/stream/run-1"


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection: request, then read the response head and body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, endpoint: Endpoint) -> HTTPConnection:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, limit=1 << 22)
        return cls(reader, writer, f"{endpoint.host}:{endpoint.port}")

    def send(self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    async def body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            async for chunk in self.chunks():
                out += chunk
            return bytes(out)
        return b""

    async def chunks(self):  # type: ignore[no-untyped-def]
        """The pieces of a chunked body, as they arrive."""
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            data = await self.reader.readexactly(size + 2)
            yield data[:-2]

    async def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        self.send(method, target, headers, body)
        status, response_headers = await self.head()
        return status, response_headers, await self.body(response_headers)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Latencies:
    samples_ns: list[int] = field(default_factory=list)
    received: int = 0
    expected: int = 0
    all_received: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, payload: bytes, now_ns: int) -> None:
        for line in payload.split(b"\n"):
            if b":" in line:
                sent = int(line.split(b":", 1)[1])
                self.samples_ns.append(now_ns - sent)
                self.received += 1
        if self.expected and self.received >= self.expected:
            self.all_received.set()

    async def wait_all(self, expected: int, timeout: float) -> None:
        """Until ``expected`` lines have arrived (or ``timeout`` seconds pass)."""
        self.expected = expected
        if self.received >= expected:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.all_received.wait(), timeout)

    def percentile_ms(self, p: float) -> float:
        if not self.samples_ns:
            return float("nan")
        ordered = sorted(self.samples_ns)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] / 1e6


async def create_stream(endpoint: Endpoint, name: str, content_type: str = "text/plain", body: bytes = b"") -> None:
    conn = await HTTPConnection.open(endpoint)
    try:
        status, _, _ = await conn.request("PUT", f"{endpoint.prefix}/{name}", {"Content-Type": content_type}, body)
        if status not in (200, 201):
            raise RuntimeError(f"PUT {name}: {status}")
    finally:
        conn.close()


async def sse_reader(
    endpoint: Endpoint,
    name: str,
    latencies: Latencies,
    ready: Callable[[], None],
    stop: asyncio.Event,
    offset: str = "now",
) -> None:
    """Follow a stream over SSE; every data line's latency goes to ``latencies``."""
    while not stop.is_set():
        conn = await HTTPConnection.open(endpoint)
        try:
            conn.send("GET", f"{endpoint.prefix}/{name}?offset={offset}&live=sse", {"Accept": "text/event-stream"})
            status, _ = await conn.head()
            if status != 200:
                raise RuntimeError(f"SSE {name}: {status}")
            buffer = b""
            event = b""
            data: list[bytes] = []
            async for chunk in conn.chunks():
                now = time.time_ns()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"event:"):
                        event = line[6:].strip()
                    elif line.startswith(b"data:"):
                        data.append(line[5:])
                    elif line == b"":
                        if event == b"data":
                            latencies.record(b"\n".join(data), now)
                        elif event == b"control":
                            control = b"\n".join(data)
                            start = control.find(b'"streamNextOffset":"') + 20
                            offset = control[start : control.find(b'"', start)].decode()
                            ready()
                        event, data = b"", []
                if stop.is_set():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.close()


async def long_poll_reader(
    endpoint: Endpoint, name: str, latencies: Latencies, ready: Callable[[], None], stop: asyncio.Event
) -> None:
    conn = await HTTPConnection.open(endpoint)
    try:
        status, headers, _ = await conn.request("GET", f"{endpoint.prefix}/{name}?offset=now")
        offset, cursor = headers["stream-next-offset"], ""
        ready()
        while not stop.is_set():
            target = f"{endpoint.prefix}/{name}?offset={offset}&live=long-poll" + (
                f"&cursor={cursor}" if cursor else ""
            )
            status, headers, body = await conn.request("GET", target)
            now = time.time_ns()
            if status == 200:
                latencies.record(body, now)
            offset = headers.get("stream-next-offset", offset)
            cursor = headers.get("stream-cursor", cursor)
    finally:
        conn.close()


async def writer(endpoint: Endpoint, name: str, count: int, interval: float, seq_start: int = 0) -> int:
    """Append ``count`` lines, one per request, ``interval`` seconds apart (0: back to back)."""
    conn = await HTTPConnection.open(endpoint)
    try:
        next_at = time.monotonic()
        for seq in range(seq_start, seq_start + count):
            body = f"{seq}:{time.time_ns()}\n".encode()
            status, _, _ = await conn.request("POST", f"{endpoint.prefix}/{name}", {"Content-Type": "text/plain"}, body)
            if status not in (200, 204):
                raise RuntimeError(f"POST {name}: {status}")
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        return count
    finally:
        conn.close()


async def gather_ready(count: int, start: Callable[[Callable[[], None]], Awaitable[None]]) -> list[asyncio.Task[None]]:
    """Start ``count`` readers and wait until each has reported ready once."""
    remaining = count
    all_ready = asyncio.Event()

    def once() -> Callable[[], None]:
        fired = False

        def fire() -> None:
            nonlocal fired, remaining
            if not fired:
                fired = True
                remaining -= 1
                if remaining == 0:
                    all_ready.set()

        return fire

    tasks = [asyncio.create_task(start(once())) for _ in range(count)]
    await asyncio.wait_for(all_ready.wait(), 120)
    return tasks


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
