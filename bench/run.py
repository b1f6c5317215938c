"""Benchmark: the Node reference server and ours, side by side, same load, one run.

    python bench/run.py            # everything (about 12 minutes on 2 cores)
    python bench/run.py --quick    # shorter runs and fewer readers, to try the harness

Servers: the reference (``@durable-streams/server`` 0.3.7, in-memory), ours with memory storage
on 1 worker, and ours with Redis storage on 2 workers (against a throwaway redis-server of the
harness's own). ``--servers`` also takes ``redis-N`` (N workers on one Redis), ``cluster-N`` (N
workers on a throwaway 3-master Redis Cluster) and ``cluster`` (cluster-1, cluster-2, cluster-4):

    python bench/run.py --servers redis-1,redis-2,redis-4,cluster --scenarios appends,sse

Load: ``wrk`` for HTTP throughput, ``bench/live.py`` (asyncio) for live readers.
Prints a table and writes ``bench/results/latest.json`` with every number and the ratios
(ours / reference for throughput, reference / ours for latency and memory: above 1 means ours is
better).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import live

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def rss(self) -> int:
        """Resident memory of the server's whole process tree (workers included), in bytes."""
        root = psutil.Process(self.process.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) used so far by the server's process tree, and by the Redis
        servers it runs against (0 for none)."""

        def tree(proc: psutil.Process) -> float:
            total = 0.0
            for one in [proc, *proc.children(recursive=True)]:
                try:
                    times = one.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            return total

        return tree(psutil.Process(self.process.pid)), sum(tree(psutil.Process(p.pid)) for p in self.extra)

    def stop(self) -> None:
        for proc in [self.process, *self.extra]:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"HEAD /v1/stream/ready-check HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/1.1"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def start_reference() -> Server:
    if not (BENCH / "node_modules" / "@durable-streams" / "server").is_dir():
        # Not `npm ci`: newer npm rejects a lock file that lacks other platforms' optional
        # packages (msgpackr-extract's), which the registry here does not carry; `install` still
        # takes the locked versions.
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=BENCH, check=True)
    port = free_port()
    process = subprocess.Popen(
        ["node", "reference-server.mjs"],
        cwd=BENCH,
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(port, process, "reference server")
    return Server("reference", port, process)


def start_redis() -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(7).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0", process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_cluster(masters: int = 3) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A throwaway Redis Cluster (masters only: the bench measures the serving path)."""
    ports: list[int] = []
    while len(ports) < masters:  # the cluster bus listens 10000 above each port
        port = free_port()
        if port <= 55535 and port not in ports:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    processes = []
    for port in ports:
        directory = tempfile.mkdtemp(prefix="bench-cluster-")
        processes.append(
            subprocess.Popen(
                [
                    *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", directory),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for port in ports:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
    nodes = [f"127.0.0.1:{port}" for port in ports]
    subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    for port in ports:
        while (
            b"cluster_state:ok"
            not in subprocess.run(["redis-cli", "-p", str(port), "CLUSTER", "INFO"], capture_output=True).stdout
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.05)
    return "redis+cluster://" + ",".join(nodes), processes


def start_ours(name: str, storage: str, workers: int, extra: list[subprocess.Popen[bytes]] | None = None) -> Server:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "durable_streams_asgi.cli",
            "serve",
            "--port",
            str(port),
            "--storage",
            storage,
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(port, process, name)
    return Server(name, port, process, extra or [])


# -- scenarios -----------------------------------------------------------------------------------


def run_wrk(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(["wrk", *args], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        "requests": requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(0) if socket_errors else "",
    }


def cpu_per_operation(server: Server, before: tuple[float, float], operations: int, key: str) -> dict[str, float]:
    """CPU microseconds per operation since ``before``: the server's, Redis's, and both."""
    after = server.cpu_seconds()
    ours, redis = ((a - b) * 1e6 / max(operations, 1) for a, b in zip(after, before, strict=True))
    return {f"{key}_server_cpu_us": ours, f"{key}_redis_cpu_us": redis, f"{key}_cpu_us": ours + redis}


async def scenario_appends(ep: live.Endpoint, server: Server, duration: int) -> dict[str, Any]:
    for i in range(32):
        await live.create_stream(ep, f"s{i}")
    before = server.cpu_seconds()
    result = run_wrk(
        [
            "-t2",
            "-c64",
            f"-d{duration}s",
            "-s",
            str(BENCH / "append.lua"),
            f"http://{ep.host}:{ep.port}",
            "--",
            ep.prefix,
        ]
    )
    return {
        "appends_per_s": result["rps"],
        "non_2xx": result["non_2xx"],
        "socket_errors": result["socket_errors"],
        **cpu_per_operation(server, before, result["requests"], "append"),
    }


async def scenario_catchup(ep: live.Endpoint, duration: int) -> dict[str, Any]:
    payload = os.urandom(1 << 20)
    await live.create_stream(ep, "big", "application/octet-stream", payload)
    conn = await live.HTTPConnection.open(ep)
    status, headers, body = await conn.request("GET", f"{ep.prefix}/big?offset=-1")
    conn.close()
    if status != 200 or body != payload or "stream-up-to-date" not in headers:
        raise RuntimeError("catch-up read did not return the whole stream in one response")
    result = run_wrk(["-t2", "-c16", f"-d{duration}s", f"http://{ep.host}:{ep.port}{ep.prefix}/big?offset=-1"])
    return {"catchup_mb_per_s": result["rps"] * len(payload) / 1e6, "non_2xx": result["non_2xx"]}


async def scenario_fanout(
    ep: live.Endpoint, server: Server, mode: str, readers: int, messages: int, rate: float
) -> dict[str, Any]:
    name = f"fanout-{mode}"
    await live.create_stream(ep, name)
    latencies, stop = live.Latencies(), asyncio.Event()
    reader = live.sse_reader if mode == "sse" else live.long_poll_reader
    tasks = await live.gather_ready(readers, lambda ready: reader(ep, name, latencies, ready, stop))
    before = server.cpu_seconds()
    await live.writer(ep, name, messages, 1 / rate)
    expected = readers * messages
    await latencies.wait_all(expected, 15)
    cpu = cpu_per_operation(server, before, latencies.received, f"{mode}_delivery")
    stop.set()
    await live.cancel_all(tasks)
    return {
        **cpu,
        f"{mode}_p50_ms": latencies.percentile_ms(50),
        f"{mode}_p99_ms": latencies.percentile_ms(99),
        f"{mode}_delivered": latencies.received,
        f"{mode}_expected": expected,
    }


async def scenario_tokens(ep: live.Endpoint, generations: int, tokens: int) -> dict[str, Any]:
    names = [f"gen-{i}" for i in range(generations)]
    for name in names:
        await live.create_stream(ep, name)
    latencies, stop = live.Latencies(), asyncio.Event()
    readers = iter(names)
    tasks = await live.gather_ready(
        generations, lambda ready: live.sse_reader(ep, next(readers), latencies, ready, stop)
    )
    started = time.monotonic()
    await asyncio.gather(*(live.writer(ep, name, tokens, 0) for name in names))
    expected = generations * tokens
    await latencies.wait_all(expected, 30)
    elapsed = time.monotonic() - started
    stop.set()
    await live.cancel_all(tasks)
    return {
        "tokens_per_s": latencies.received / elapsed,
        "token_p99_ms": latencies.percentile_ms(99),
        "tokens_delivered": latencies.received,
        "tokens_expected": expected,
    }


async def scenario_idle(ep: live.Endpoint, server: Server, counts: list[int]) -> dict[str, Any]:
    await live.create_stream(ep, "idle")
    out: dict[str, Any] = {}
    for count in counts:
        await asyncio.sleep(1.0)  # let the previous round's connections be torn down
        before = server.rss()
        stop = asyncio.Event()
        sink = live.Latencies()
        tasks = await live.gather_ready(
            count, lambda ready, sink=sink, stop=stop: live.sse_reader(ep, "idle", sink, ready, stop)
        )
        await asyncio.sleep(1.0)  # a measurement window, not synchronisation
        after = server.rss()
        stop.set()
        await live.cancel_all(tasks)
        out[f"idle_kib_per_reader_{count}"] = (after - before) / count / 1024
    return out


# -- the run -------------------------------------------------------------------------------------

METRICS: list[tuple[str, str, bool]] = [
    # (key, label, higher is better)
    ("appends_per_s", "appends/s (100 B, 32 streams, 64 conns)", True),
    ("append_cpu_us", "CPU us per append (server + Redis)", False),
    ("append_redis_cpu_us", "  of which Redis", False),
    ("catchup_mb_per_s", "catch-up MB/s (1 MiB, 16 conns)", True),
    ("sse_p50_ms", "SSE fan-out p50 ms", False),
    ("sse_p99_ms", "SSE fan-out p99 ms", False),
    ("long-poll_p50_ms", "long-poll fan-out p50 ms", False),
    ("long-poll_p99_ms", "long-poll fan-out p99 ms", False),
    ("sse_delivery_cpu_us", "CPU us per SSE delivery", False),
    ("long-poll_delivery_cpu_us", "CPU us per long-poll delivery", False),
    ("tokens_per_s", "token streaming tokens/s", True),
    ("token_p99_ms", "token latency p99 ms", False),
    ("idle_kib_per_reader_1000", "idle SSE reader KiB (1,000)", False),
    ("idle_kib_per_reader_5000", "idle SSE reader KiB (5,000)", False),
]


CLUSTER_SET = ["cluster-1", "cluster-2", "cluster-4"]
SCENARIOS = ("appends", "catchup", "sse", "long-poll", "tokens", "idle")


async def bench_server(server: Server, quick: bool, log: Callable[[str], None], only: set[str]) -> dict[str, Any]:
    ep = live.Endpoint("127.0.0.1", server.port, f"/v1/stream/bench-{uuid.uuid4().hex[:8]}")
    readers = 100 if quick else 500
    results: dict[str, Any] = {}
    if "appends" in only:
        log(f"[{server.name}] appends")
        results |= await scenario_appends(ep, server, 3 if quick else 10)
    if "catchup" in only:
        log(f"[{server.name}] catch-up")
        results |= await scenario_catchup(ep, 3 if quick else 10)
    for mode in ("sse", "long-poll"):
        if mode in only:
            log(f"[{server.name}] {mode} fan-out, {readers} readers")
            results |= await scenario_fanout(ep, server, mode, readers, 20 if quick else 50, 20)
    if "tokens" in only:
        log(f"[{server.name}] token streaming")
        results |= await scenario_tokens(ep, 20 if quick else 100, 100 if quick else 500)
    if "idle" in only:
        log(f"[{server.name}] idle readers")
        results |= await scenario_idle(ep, server, [200, 1000] if quick else [1000, 5000])
    return results


def ratio(ours: float | None, ref: float | None, higher_is_better: bool) -> float | None:
    if not ours or not ref or ours != ours or ref != ref:
        return None
    return ours / ref if higher_is_better else ref / ours


def run_server(name: str, quick: bool, log: Callable[[str], None], only: set[str]) -> dict[str, Any]:
    """Start server ``name`` fresh, run the scenarios against it, stop it."""
    if name == "reference":
        server = start_reference()
    elif name == "memory":
        server = start_ours("memory-1-worker", "memory", 1)
    elif name == "redis" or re.fullmatch(r"redis-\d+", name):
        workers = int(name.partition("-")[2] or 2)
        url, redis = start_redis()
        server = start_ours(f"redis-{workers}-workers", url, workers, [redis])
    elif re.fullmatch(r"cluster-\d+", name):
        workers = int(name.partition("-")[2])
        url, nodes = start_cluster()
        server = start_ours(f"cluster-{workers}-workers", url, workers, nodes)
    else:
        sys.exit(f"unknown server {name!r}")
    try:
        return asyncio.run(bench_server(server, quick, log, only))
    finally:
        server.stop()


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if key in r]
        numbers = [v for v in values if isinstance(v, (int, float)) and v == v]
        out[key] = statistics.median(numbers) if numbers and len(numbers) == len(values) else values[-1]
    return out


def spread_of(rounds: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    return {
        key: (min(values), max(values))
        for key in rounds[0]
        if (values := [r[key] for r in rounds if isinstance(r.get(key), (int, float))])
    }


def cell(value: Any, spread: tuple[float, float] | None, rounds: int) -> str:
    if not isinstance(value, (int, float)):
        return "nan"
    if rounds == 1 or spread is None:
        return f"{value:,.1f}"
    return f"{value:,.1f} ({spread[0]:,.1f}-{spread[1]:,.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, fewer readers")
    parser.add_argument("--servers", default="reference,memory,redis", help="which servers, comma separated")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"which scenarios, comma separated ({', '.join(SCENARIOS)})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="fresh servers each round, in alternating order; medians reported (default 3, 1 with --quick)",
    )
    parser.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="where to write results")
    args = parser.parse_args()
    only = set(args.scenarios.split(","))
    if only - set(SCENARIOS):
        sys.exit(f"unknown scenarios: {', '.join(sorted(only - set(SCENARIOS)))}")
    for tool in ("wrk", "node", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is required (see bench/README.md)")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    names = [n for name in args.servers.split(",") for n in (CLUSTER_SET if name == "cluster" else [name])]
    rounds = args.rounds or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(rounds):
        # Alternating order: whatever the machine does over time (another tenant, a warm cache)
        # weighs on every server alike.
        for name in names if round_ % 2 == 0 else names[::-1]:
            log(f"round {round_ + 1} of {rounds}: {name}")
            runs[name].append(run_server(name, args.quick, log, only))
    results = {name: median_of(rounds_) for name, rounds_ in runs.items()}
    spreads = {name: spread_of(rounds_) for name, rounds_ in runs.items()}

    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick,
        "rounds": rounds,
        "results": results,
        "spreads": spreads,
        "runs": runs,
        "ratios": {},
    }
    ref = results.get("reference", {})
    for name in results:
        if name != "reference":
            report["ratios"][name] = {key: ratio(results[name].get(key), ref.get(key), hib) for key, _, hib in METRICS}
    # A latency over the messages that arrived says nothing about those that did not: a run in
    # which readers missed messages is reported as such, loudly.
    report["incomplete"] = [
        f"{name} (round {i + 1}): {kind} delivered {res[f'{kind}_delivered']:,} of {res[f'{kind}_expected']:,}"
        for name, rounds_ in runs.items()
        for i, res in enumerate(rounds_)
        for kind in ("sse", "long-poll", "tokens")
        if f"{kind}_expected" in res and res[f"{kind}_delivered"] < res[f"{kind}_expected"]
    ]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))

    names = list(results)
    ours = [n for n in names if n != "reference"]
    header = ["metric", *names, *(f"{n} vs ref" for n in ours)]
    rows = []
    for key, label, _ in METRICS:
        row = [label, *(cell(results[n].get(key), spreads[n].get(key), rounds) for n in names)]
        for n in ours:
            r = report["ratios"][n].get(key)
            row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print(
        f"\nmedians of {rounds} round(s), (min-max) beside them; ratios of the medians, above 1.00x means ours "
        f"is better. JSON: {args.json}"
    )
    for line in report["incomplete"]:
        print(f"INCOMPLETE: {line} (messages missed or late past the wait; latencies above cover only those delivered)")
    if report["incomplete"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
