"""Graceful drain: on SIGTERM, live readers get a clean end at once, running generations a bounded
time, and the process exits within the bound; in the standalone server and in a host app under
uvicorn, hypercorn and gunicorn (with uvicorn workers), each started as users start them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from durable_streams_asgi.storage.redis import RedisStorage

from .conftest import free_port, spawn, stop, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
READERS = 100
LONG_POLLS = 10


async def _sse_reader(client: httpx.AsyncClient, url: str, connected: asyncio.Event, counter: list[int]) -> list[str]:
    """Follow ``url`` over SSE; return the events' names, in order, once the response ends."""
    events: list[str] = []
    async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                events.append(line[6:].strip())
                if len(events) == 1:
                    counter[0] += 1
                    if counter[0] == READERS:
                        connected.set()
    return events


async def _long_poll(client: httpx.AsyncClient, url: str, offset: str) -> int:
    response = await client.get(url, params={"offset": offset, "live": "long-poll"})
    return response.status_code


async def _drain_under_load(process: subprocess.Popen[bytes], base: str, *, generate: bool) -> dict[str, float]:
    """Open the readers (and a generation), SIGTERM the server, and measure."""
    limits = httpx.Limits(max_connections=READERS + LONG_POLLS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        stream = f"/v1/stream/drain-{unique_prefix()}"
        created = await client.put(stream, content=b"first ", headers={"content-type": "text/plain"})
        assert created.status_code == 201
        offset = created.headers["stream-next-offset"]
        generation = None
        if generate:
            started = await client.post("/generate", params={"path": f"/gen-{unique_prefix()}"})
            assert started.status_code == 201, started.text
            generation = started.text
        connected, counter = asyncio.Event(), [0]
        readers = [asyncio.create_task(_sse_reader(client, stream, connected, counter)) for _ in range(READERS)]
        await asyncio.wait_for(connected.wait(), 30)
        polls = [asyncio.create_task(_long_poll(client, stream, offset)) for _ in range(LONG_POLLS)]
        await asyncio.sleep(0.3)  # let the long-polls reach their wait (no event marks it from outside)
        assert not any(p.done() for p in polls)
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*readers), 15)
        readers_ended = time.monotonic() - began
        statuses = await asyncio.wait_for(asyncio.gather(*polls), 15)
    exit_code = await asyncio.get_running_loop().run_in_executor(None, process.wait, 30)
    exited = time.monotonic() - began
    for events in results:
        # Data and control for the first read, then the drain's last control event: a clean end,
        # no error, and the client knows where to resume.
        assert events[0] == "data" and events[-1] == "control", events
    assert statuses == [204] * LONG_POLLS
    # uvicorn re-raises the signal once it has shut down (so the exit status says what ended it).
    assert exit_code in (0, -signal.SIGTERM), exit_code
    measured = {"readers_ended": readers_ended, "exited": exited, "generation": 1.0 if generation else 0.0}
    print("drain:", measured)
    return measured


def _serve_standalone(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-level", "warning", *extra]
    return spawn(args, tmp_path / "server.log", f"{base}/readyz"), base


def test_the_standalone_server_drains_sse_and_long_polls_at_once(tmp_path: Path) -> None:
    process, base = _serve_standalone(tmp_path)
    try:
        measured = asyncio.run(_drain_under_load(process, base, generate=False))
    finally:
        stop(process)
    assert measured["readers_ended"] < 3.0, measured
    assert measured["exited"] < 10.0, measured  # the default --drain-timeout


def test_the_standalone_server_on_redis_with_two_workers_drains(tmp_path: Path, redis_url: str) -> None:
    process, base = _serve_standalone(
        tmp_path, "--storage", redis_url, "--workers", "2", "--key-prefix", unique_prefix(), "--drain-timeout", "5"
    )
    try:
        measured = asyncio.run(_drain_under_load(process, base, generate=False))
    finally:
        stop(process)
    assert measured["readers_ended"] < 3.0, measured
    assert measured["exited"] < 5.0, measured


SERVERS = {
    "uvicorn": ["uvicorn", "tests.frameworks.drain_host:app", "--host", "127.0.0.1", "--port", "{port}"],
    # Hypercorn's worker processes hear of a shutdown through an event of its own, not a signal:
    # the drain needs the in-process server (--workers 0; see the README's Graceful shutdown).
    "hypercorn": ["hypercorn", "--workers", "0", "--bind", "127.0.0.1:{port}", "tests.frameworks.drain_host:app"],
    "gunicorn": [
        "gunicorn", "--bind", "127.0.0.1:{port}", "--worker-class", "uvicorn.workers.UvicornWorker",
        "--workers", "1", "tests.frameworks.drain_host:app",
    ],
}  # fmt: skip


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_a_host_app_drains_and_bounds_its_generations(server: str, tmp_path: Path, redis_url: str) -> None:
    """The generation never ends by itself: it gets its time (the default, 8 s, under uvicorn;
    2 s elsewhere, to keep the suite short), is interrupted, and its stream ends closed."""
    if server == "gunicorn" and sys.platform == "win32":  # pragma: no cover
        pytest.skip("gunicorn does not run on Windows")
    port = free_port()
    prefix = unique_prefix()
    env = {**os.environ, "REDIS_URL": redis_url, "DURABLE_STREAMS_KEY_PREFIX": prefix}
    bound = 10.0
    if server != "uvicorn":
        env["DRAIN_SHUTDOWN_TIMEOUT"] = "2"
        bound = 4.0
    args = [part.format(port=port) for part in SERVERS[server]]
    base = f"http://127.0.0.1:{port}"
    process = spawn(args, tmp_path / "server.log", f"{base}/healthz", cwd=ROOT, env=env)
    try:
        measured = asyncio.run(_drain_under_load(process, base, generate=True))
    finally:
        stop(process)
    log = (tmp_path / "server.log").read_text()
    assert measured["readers_ended"] < 3.0, (measured, log)
    assert measured["exited"] < bound, (measured, log)
    assert "Traceback" not in log, log

    async def generation_stream_closed() -> None:
        storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
        try:
            keys = [key async for key in storage.client.scan_iter(match=f"{prefix}{{/gen-*}}:m")]
            assert len(keys) == 1, keys
            path = keys[0].decode().split("{", 1)[1].rsplit("}", 1)[0]
            info = await storage.head(path)
            assert info.closed, "the interrupted generation's stream was not closed"
            result = await storage.read(path, 0, 1 << 20)
            text = b"".join(result.items).decode()
            tokens = [t for t in text.split("token ") if t.strip()]
            numbers = [int(t.split()[0]) for t in tokens if t.split()[0].isdigit()]
            assert numbers == list(range(len(numbers))) and len(numbers) > 10, text[-200:]
        finally:
            await storage.aclose()

    asyncio.run(generation_stream_closed())
