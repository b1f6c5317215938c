"""The upstream conformance suite (npm @durable-streams/server-conformance-tests), unfiltered,
against the real CLI server: the judge of protocol behaviour."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, unique_prefix

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


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    storage, workers = request.param
    if storage == "redis":
        storage = request.getfixturevalue("redis_url")
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
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
            "--key-prefix",
            unique_prefix(),
            "--long-poll-timeout",
            str(LONG_POLL_SECONDS),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # readiness: the health check answers once every worker can serve
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}: {(tmp_path / 'server.log').read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not start within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    errors = (tmp_path / "server.log").read_text()
    assert "Traceback" not in errors, errors[-5000:]


SERVERS = [pytest.param(("memory", 1), id="memory"), pytest.param(("redis", 2), id="redis-2-workers")]


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
