"""The standalone server's request path without sockets: CPU, or instructions, per operation.

Drives the CLI's app (``cli.build_app``) through this package's HTTP/1.1 protocol with in-memory
transports, so that neither the kernel nor a load generator shares the measurement:

    python bench/inprocess.py appends                      # CPU us per append, memory storage
    python bench/inprocess.py long-poll                    # CPU us per long-poll delivery
    python bench/inprocess.py appends --redis redis://127.0.0.1:7000/0   # a Redis of your own
    python bench/inprocess.py appends --instructions       # instructions per append (callgrind)

``appends``: 64 connections, each posting 100-byte text appends round-robin over 32 streams, the
next as soon as its response is written. ``long-poll``: 500 connections long-polling one stream,
20 appends made in the process, each reader re-polling as soon as its data is written.

CPU time here still swings with what else the machine runs. ``--instructions`` runs the scenario
twice under ``valgrind --tool=callgrind`` (counting only the measured round) at two sizes and
prints the difference per operation, which leaves out start-up and first-request costs; it is
the same to a fraction of a percent run after run, so a change of 1% on the hot path shows
(about a minute per count). On Redis, batches depend on timing, so counts vary more there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STREAMS = 32
BODY = b"x" * 100
_OFFSET = re.compile(rb"stream-next-offset: ([^\r]+)\r\n", re.I)


class _Transport(asyncio.Transport):
    """What the protocol writes goes to the client object at once."""

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.client = client
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 4437), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.client.on_write(data)

    def writelines(self, data: Any) -> None:
        self.client.on_write(b"".join(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Client:
    def __init__(self, run: _Run, index: int) -> None:
        from durable_streams_asgi.http11.connection import HTTP11Protocol

        self.run = run
        self.index = index
        self.offset = run.start
        self.protocol = HTTP11Protocol(run.config, run.state, _loop=run.loop)
        self.protocol.connection_made(_Transport(self))

    def request(self) -> bytes:
        if self.run.scenario == "appends":
            self.index += 1
            path = b"/v1/stream/bench/s%d" % (self.index % STREAMS)
            return (
                b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:4437\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 100\r\n\r\n" + BODY
            )
        return (
            b"GET /v1/stream/bench/lp?offset="
            + self.offset
            + b"&live=long-poll HTTP/1.1\r\nHost: 127.0.0.1:4437\r\n\r\n"
        )

    def send(self) -> None:
        run = self.run
        run.requests += 1
        if run.reached is not None and run.requests >= run.wanted and not run.reached.done():
            run.reached.set_result(None)
        self.protocol.data_received(self.request())

    def on_write(self, data: bytes) -> None:
        expected = b"HTTP/1.1 204" if self.run.scenario == "appends" else b"HTTP/1.1 200"
        if not data.startswith(expected):
            self.run.failed.append(data[:200])
            for waiting in (self.run.reached, self.run.finished):
                if waiting is not None and not waiting.done():
                    waiting.set_result(None)
            return
        if self.run.scenario == "long-poll":
            found = _OFFSET.search(data)
            assert found is not None
            self.offset = found.group(1)
        self.run.done += 1
        if self.run.scenario == "appends" and self.run.done >= self.run.operations:
            if not self.run.finished.done():
                self.run.finished.set_result(None)
            return
        self.run.loop.call_soon(self.send)


class _Run:
    def __init__(self, scenario: str, config: Any, state: Any, loop: asyncio.AbstractEventLoop, start: bytes) -> None:
        self.scenario = scenario
        self.config = config
        self.state = state
        self.loop = loop
        self.start = start
        self.operations = 0
        self.requests = self.done = 0
        self.failed: list[bytes] = []
        self.wanted = 0
        self.reached: asyncio.Future[None] | None = None
        self.finished: asyncio.Future[None] = loop.create_future()


def _toggle_callgrind(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], capture_output=True)


async def _settle(run: _Run, requests: int) -> None:
    """Until ``requests`` requests were sent, and then a few loop turns for them to reach their wait."""
    if run.requests < requests and not run.failed:
        run.wanted, run.reached = requests, run.loop.create_future()
        await run.reached
    for _ in range(5):
        await asyncio.sleep(0)


async def measure(args: argparse.Namespace) -> list[float]:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from durable_streams_asgi import cli, offsets
    from durable_streams_asgi.http11.connection import HTTP11Protocol
    from durable_streams_asgi.storage.base import AppendRequest, StreamConfig
    from durable_streams_asgi.storage.memory import MemoryStorage
    from durable_streams_asgi.tuning import tune_gc

    loop = asyncio.get_running_loop()
    if args.redis:
        import redis

        from durable_streams_asgi.storage.redis import RedisStorage

        redis.Redis.from_url(args.redis).flushdb()
        storage: Any = RedisStorage.from_url(args.redis)
    else:
        storage = MemoryStorage()
    app = cli.build_app(storage, metrics=not args.no_metrics)
    config = Config(app, http=HTTP11Protocol, lifespan="off", log_level="warning", access_log=False)
    config.load()
    state = ServerState()
    text = StreamConfig(content_type="text/plain")
    for i in range(STREAMS):
        await storage.create(f"/bench/s{i}", text)
    tail = (await storage.create("/bench/lp", text)).info.tail
    tune_gc()
    results = []
    for round_ in range(args.rounds):
        counted = args.callgrind and round_ == args.rounds - 1
        run = _Run(args.scenario, config, state, loop, offsets.encode_offset(tail).encode())
        if args.scenario == "appends":
            run.operations = args.n
            clients = [_Client(run, i) for i in range(64)]
            if counted:
                _toggle_callgrind(True)
            began = time.process_time()
            for client in clients:
                client.send()
            await run.finished
        else:
            clients = [_Client(run, i) for i in range(args.readers)]
            for client in clients:
                client.send()
            await _settle(run, args.readers)
            if counted:
                _toggle_callgrind(True)
            began = time.process_time()
            for m in range(args.n):
                await storage.append("/bench/lp", AppendRequest("text/plain", [b"m%06d" % m]))
                await _settle(run, args.readers * (m + 2))
        spent = time.process_time() - began
        if counted:
            _toggle_callgrind(False)
        if run.failed:
            raise SystemExit(f"unexpected response: {run.failed[0]!r}")
        results.append(spent / run.done * 1e6)
        for client in clients:
            client.protocol.connection_lost(None)
        tail = (await storage.head("/bench/lp")).tail
        await asyncio.sleep(0.05)
    await storage.aclose()
    return results


def count_instructions(args: argparse.Namespace) -> None:
    sizes = (args.n, args.n * 3)
    totals = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as directory:
            out = Path(directory) / "callgrind.out"
            command = [
                "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                sys.executable, __file__, args.scenario, "--callgrind", "-n", str(size), "--rounds", "2",
            ]  # fmt: skip
            if args.redis:
                command += ["--redis", args.redis]
            if args.no_metrics:
                command.append("--no-metrics")
            if args.scenario == "long-poll":
                command += ["--readers", str(args.readers)]
            subprocess.run(command, check=True, capture_output=True)
            summary = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True).stdout
            found = re.search(r"([\d,]+) \S* *PROGRAM TOTALS", summary)
            assert found is not None, summary[:500]
            totals.append(int(found.group(1).replace(",", "")))
    per = args.readers if args.scenario == "long-poll" else 1
    marginal = (totals[1] - totals[0]) / ((sizes[1] - sizes[0]) * per)
    unit = "delivery" if args.scenario == "long-poll" else "append"
    print(f"{marginal / 1000:.1f}k instructions per {unit} (between {sizes[0]} and {sizes[1]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=["appends", "long-poll"])
    parser.add_argument("-n", type=int, help="appends (appends scenario) or messages (long-poll)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--readers", type=int, default=500)
    parser.add_argument("--redis", help="a Redis URL of your own (its database is emptied)")
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument("--instructions", action="store_true", help="count with callgrind (valgrind)")
    parser.add_argument("--callgrind", action="store_true", help=argparse.SUPPRESS)  # (run under valgrind)
    args = parser.parse_args()
    if args.n is None:
        args.n = (2000 if args.instructions else 60000) if args.scenario == "appends" else 20
    if args.instructions:
        count_instructions(args)
        return
    import uvloop

    results = uvloop.run(measure(args))
    unit = "delivery" if args.scenario == "long-poll" else "append"
    print(f"CPU us per {unit}: " + " ".join(f"{r:.2f}" for r in results) + f" (min {min(results):.2f})")


if __name__ == "__main__":
    main()
