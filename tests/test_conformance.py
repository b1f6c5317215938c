"""The upstream conformance suite (npm @durable-streams/server-conformance-tests), unfiltered,
against the real CLI server: the judge of protocol behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, spawn, spawn_proxy, sse_events, stop, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "conformance"
# The server's long-poll timeout: short, because several suite tests wait for one to expire
# inside vitest's 5 s default test timeout.
LONG_POLL_SECONDS = 1


def ensure_conformance_installed() -> str:
    npx = shutil.which("npx")
    if npx is None:
        pytest.fail("Node.js (npx) is required to run the conformance suite: see README, Prerequisites")
    if not (CONFORMANCE / "node_modules" / "@durable-streams" / "server-conformance-tests").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=CONFORMANCE, check=True)
    return npx


def serve_args(
    port: int, storage: str, workers: int, prefix: str, long_poll_seconds: float = LONG_POLL_SECONDS
) -> list[str]:
    return [
        "durable_streams_asgi.cli",
        "serve",
        "--port",
        str(port),
        "--storage",
        storage,
        "--workers",
        str(workers),
        "--key-prefix",
        prefix,
        "--long-poll-timeout",
        str(long_poll_seconds),
        "--log-level",
        "warning",
        # The suite's webhook receivers listen on 127.0.0.1.
        "--allow-loopback-webhooks",
    ]


def start_servers(
    count: int,
    storage: str,
    workers: int,
    prefix: str,
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
    long_poll_seconds: float = LONG_POLL_SECONDS,
) -> tuple[list[str], list[Path]]:
    """``count`` CLI servers on free ports, added to ``started`` as each starts (for the caller to
    stop, whatever happens): their URLs and logs."""
    upstreams, logs = [], []
    for i in range(count):
        port = free_port()
        logs.append(tmp_path / f"server{i}.log")
        url = f"http://127.0.0.1:{port}"
        args = serve_args(port, storage, workers, prefix, long_poll_seconds)
        started.append(spawn(args, logs[-1], f"{url}/healthz"))
        upstreams.append(url)
    return upstreams, logs


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The server under test: one process, or two behind a round-robin proxy or behind nginx."""
    storage, workers, processes = request.param
    if storage in ("redis", "cluster"):
        storage = request.getfixturevalue("redis_cluster_url" if storage == "cluster" else "redis_url")
    prefix = unique_prefix()  # every process of this run shares the streams
    if isinstance(workers, str):  # an example app, started with its documented command
        yield from serve_example(workers, storage, prefix, tmp_path)
        return
    behind_nginx = processes == "nginx"  # two processes, behind examples/deploy/nginx.conf
    started: list[subprocess.Popen[bytes]] = []
    try:
        count = 2 if behind_nginx else processes
        upstreams, logs = start_servers(count, storage, workers, prefix, tmp_path, started)
        if len(upstreams) == 1:
            yield upstreams[0]
        elif behind_nginx:
            with nginx_in_front(upstreams, tmp_path / "nginx") as url:
                yield url
        else:
            logs.append(tmp_path / "proxy.log")
            proxy, url = spawn_proxy(upstreams, logs[-1])
            started.append(proxy)
            yield url
    finally:
        for process in started:
            stop(process)
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


NGINX_CONF = ROOT / "examples" / "deploy" / "nginx.conf"
# Where nginx writes, all into the test's directory: the stock paths (/var/log/nginx,
# /var/lib/nginx) are root's, and the test runs as any user.
NGINX_FILES = {
    "access_log": "access.log",
    "client_body_temp_path": "client_body_temp",
    "proxy_temp_path": "proxy_temp",
    "fastcgi_temp_path": "fastcgi_temp",
    "uwsgi_temp_path": "uwsgi_temp",
    "scgi_temp_path": "scgi_temp",
}


def nginx_binary() -> str:
    # /usr/sbin, where the package puts it, is not on every user's PATH.
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.fail("nginx is required for the nginx conformance target: apt-get install nginx")
    return binary


def render_nginx_conf(upstreams: list[str], port: int, directory: Path) -> str:
    """examples/deploy/nginx.conf with the test's hosts and port, one worker, and every file it
    writes in ``directory``; the rest of it (every proxy directive) exactly as documented."""
    text = NGINX_CONF.read_text()
    hosts = [url.removeprefix("http://") for url in upstreams]
    files = "".join(f'    {directive} "{directory / name}";\n' for directive, name in NGINX_FILES.items())
    replacements = [
        ("server 10.0.0.11:4437 ", f"server {hosts[0]} "),
        ("server 10.0.0.12:4437 ", f"server {hosts[1]} "),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        # One worker: its round-robin alternates between the two hosts, so that two requests in
        # flight together are on different hosts (test_live_reads_through_nginx relies on it).
        ("worker_processes auto;", "worker_processes 1;"),
        ("http {\n", "http {\n" + files),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} is no longer once in {NGINX_CONF}: update this test"
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def nginx_in_front(upstreams: list[str], directory: Path) -> Iterator[str]:
    """nginx with examples/deploy/nginx.conf in front of two hosts, as a child process: its URL."""
    binary = nginx_binary()
    directory.mkdir()
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(render_nginx_conf(upstreams, port, directory))
    error_log = directory / "error.log"
    # In the foreground, so that it is our child and stop() ends it; the pid file and error log
    # (main-context settings the example leaves to the build's defaults) in our directory.
    settings = f'daemon off; pid "{directory / "nginx.pid"}"; error_log "{error_log}" warn;'
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Started as root, nginx runs its workers as nobody, who cannot enter pytest's private
        # (0700) temporary directory, where a worker would write any request body it buffers.
        settings += " user root;"
    output = directory / "nginx.out"  # what it says before it opens the error log
    process = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(conf), "-g", settings],
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # ready once a request gets through to a host
            if process.poll() is not None:
                pytest.fail(f"nginx exited with {process.returncode}: {output.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"nginx did not start within 30 s: {output.read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        stop(process)
    # Nothing went wrong between nginx and the hosts (no "upstream prematurely closed", no 502).
    # A machine that does not let nginx raise its open-file limit (a container without
    # CAP_SYS_RESOURCE) says so as an alert: that is the machine's, not the file's.
    log = error_log.read_text() if error_log.exists() else ""
    problems = [line for line in log.splitlines() if re.search(r"\[(emerg|alert|crit|error)\]", line)]
    assert all("setrlimit(RLIMIT_NOFILE" in line for line in problems), log[-5000:]


EXAMPLES = ROOT / "examples"
EXAMPLE_COMMANDS = {
    "fastapi": "main:app",
    "django": "asgi:application",
    # A trivial host app wrapped by DurableStreamsMiddleware, run from the repository root.
    "middleware": "tests.frameworks.middleware_host:app",
}
EXAMPLE_DIRS = {"middleware": ROOT}


def serve_example(name: str, storage: str, prefix: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "DURABLE_STREAMS_LONG_POLL_TIMEOUT": str(LONG_POLL_SECONDS),
        "DEMO_OPEN_WRITES": "1",
        "DURABLE_STREAMS_KEY_PREFIX": prefix,
        "DURABLE_STREAMS_ALLOW_LOOPBACK_WEBHOOKS": "1",
    }
    env.pop("REDIS_URL", None)
    if storage != "memory":
        env["REDIS_URL"] = storage
    log = tmp_path / f"{name}.log"
    url = f"http://127.0.0.1:{port}"
    process = spawn(
        ["uvicorn", EXAMPLE_COMMANDS[name], "--port", str(port), "--log-level", "warning"],
        log,
        f"{url}/",
        cwd=EXAMPLE_DIRS.get(name, EXAMPLES / f"{name}_app"),
        env=env,
    )
    try:
        yield url
    finally:
        stop(process)
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


SERVERS = [
    pytest.param(("memory", 1, 1), id="memory"),
    # As deployed: one server, two worker processes sharing the listening socket.
    pytest.param(("redis", 2, 1), id="redis-2-workers"),
    # Two server processes behind a round-robin proxy: consecutive requests of every test land
    # on different processes, so each write and its read or wake-up cross processes.
    pytest.param(("redis", 1, 2), id="redis-2-processes-round-robin"),
    # Two server processes behind the round-robin proxy on a Redis Cluster (3 masters, 3
    # replicas): streams spread over the shards, live reads woken by sharded pub/sub.
    pytest.param(("cluster", 1, 2), id="cluster-2-processes-round-robin"),
    # Two server processes behind nginx with examples/deploy/nginx.conf, as documented.
    pytest.param(("redis", 1, "nginx"), id="redis-2-processes-nginx"),
    # The examples, as their READMEs run them: the protocol through FastAPI's mount and through
    # Django's ASGI routing.
    pytest.param(("memory", "fastapi", 1), id="fastapi-example-memory"),
    pytest.param(("redis", "fastapi", 1), id="fastapi-example-redis"),
    pytest.param(("memory", "django", 1), id="django-example-memory"),
    pytest.param(("redis", "django", 1), id="django-example-redis"),
    # DurableStreamsMiddleware around a host app that does not speak lifespan.
    pytest.param(("redis", "middleware", 1), id="middleware-redis"),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("server", SERVERS, indirect=True)
def test_upstream_conformance_suite(server: str, tmp_path: Path) -> None:
    npx = ensure_conformance_installed()
    env = {
        **os.environ,
        "CONFORMANCE_BASE_URL": server,
        "CONFORMANCE_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_SECONDS * 1000),
        "NO_COLOR": "1",
        "CI": "true",
    }
    result = subprocess.run(
        [npx, "vitest", "run", "--reporter=verbose"],
        cwd=CONFORMANCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    output = result.stdout + result.stderr
    (tmp_path / "vitest.log").write_text(output)
    # vitest marks a failed test with a multiplication sign.
    failures = "\n".join(line for line in output.splitlines() if line.strip().startswith("\u00d7"))
    summary = re.search(r"^\s*Tests\s+(.*\(\d+\))\s*$", output, re.MULTILINE)
    print(f"conformance against {server}: {summary.group(1) if summary else 'no summary'}")
    assert result.returncode == 0, f"{failures}\n\n{output[-6000:]}"
    assert summary is not None and "failed" not in summary.group(1), output[-3000:]
    # Every test runs and passes, the subscription tests included: none is skipped.
    assert "skipped" not in summary.group(1), summary.group(1)
    passed = re.search(r"(\d+) passed", summary.group(1))
    assert passed is not None and int(passed.group(1)) >= 338, summary.group(1)


@pytest.fixture
def nginx_front(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """nginx in front of two server processes on one Redis: its URL and the hosts' URLs. The
    hosts' long-poll timeout is long, so that an answer within seconds is a wake-up."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        upstreams, logs = start_servers(2, redis_url, 1, unique_prefix(), tmp_path, started, long_poll_seconds=20)
        with nginx_in_front(upstreams, tmp_path / "nginx") as url:
            yield url, upstreams
    finally:
        for process in started:
            stop(process)
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


async def test_live_reads_through_nginx(nginx_front: tuple[str, list[str]]) -> None:
    """Through nginx, an SSE event arrives while its connection stays open (not buffered until it
    closes), and a long-poll is answered by an append that reached the other host."""
    url, upstreams = nginx_front
    stream, direct = f"{url}/v1/stream/nginx-live", f"{upstreams[0]}/v1/stream/nginx-live"
    text = {"Content-Type": "text/plain"}
    async with httpx.AsyncClient(timeout=30) as client:
        tail = (await client.put(stream, headers=text, content=b"a")).headers["stream-next-offset"]

        # Two readers of each kind in flight at once: nginx's one worker sends them to the two
        # hosts in turn, so one of each is on the host the appends do not go to.
        async def sse_data() -> tuple[str, float, bool]:
            params = {"offset": tail, "live": "sse"}
            async with client.stream("GET", stream, params=params) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for event, data in sse_events(response):
                    if event == "data":
                        # Still open: the SSE lifetime is 60 s, so a buffering proxy would hold
                        # this event back until then.
                        return data, time.monotonic(), not response.is_closed
            raise AssertionError("the SSE response ended without a data event")

        sse = [asyncio.create_task(sse_data()) for _ in range(2)]
        await asyncio.sleep(1)  # let them reach their wait; correctness does not depend on it
        assert not any(task.done() for task in sse)
        appended = time.monotonic()
        await client.post(direct, headers=text, content=b"b")
        for data, arrived, still_open in await asyncio.wait_for(asyncio.gather(*sse), 10):
            assert (data, still_open) == ("b", True)
            assert arrived - appended < 5

        tail = (await client.head(stream)).headers["stream-next-offset"]
        params = {"offset": tail, "live": "long-poll"}
        polls = [asyncio.create_task(client.get(stream, params=params)) for _ in range(2)]
        await asyncio.sleep(1)
        assert not any(task.done() for task in polls)
        appended = time.monotonic()
        await client.post(direct, headers=text, content=b"c")
        for response in await asyncio.wait_for(asyncio.gather(*polls), 15):
            assert (response.status_code, response.content) == (200, b"c")
        assert time.monotonic() - appended < 5  # woken by the append, not by the 20 s timeout
