"""The upstream conformance suite (npm @durable-streams/server-conformance-tests), unfiltered,
against the real CLI server: the judge of protocol behaviour."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port, spawn, spawn_proxy, stop, unique_prefix

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


def serve_args(port: int, storage: str, workers: int, prefix: str) -> list[str]:
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
        str(LONG_POLL_SECONDS),
        "--log-level",
        "warning",
    ]


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The server under test: one process, or two behind a round-robin proxy."""
    storage, workers, processes = request.param
    if storage == "redis":
        storage = request.getfixturevalue("redis_url")
    prefix = unique_prefix()  # every process of this run shares the streams
    if isinstance(workers, str):  # an example app, started with its documented command
        yield from serve_example(workers, storage, prefix, tmp_path)
        return
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        upstreams = []
        for i in range(processes):
            port = free_port()
            logs.append(tmp_path / f"server{i}.log")
            url = f"http://127.0.0.1:{port}"
            started.append(spawn(serve_args(port, storage, workers, prefix), logs[-1], f"{url}/healthz"))
            upstreams.append(url)
        if processes == 1:
            yield upstreams[0]
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
    passed = re.search(r"(\d+) passed", summary.group(1))
    assert passed is not None and int(passed.group(1)) >= 332, summary.group(1)
