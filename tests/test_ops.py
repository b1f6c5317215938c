"""Running it in production: health, readiness, metrics, TLS, proxy headers, root path, JSON logs,
against the real standalone server (``durable-streams-asgi serve``) in a subprocess."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from durable_streams_asgi import DurableStreams, cli
from durable_streams_asgi.ops import ops_app
from durable_streams_asgi.ops.prometheus import FLUSH_SECONDS
from durable_streams_asgi.settings import SETTINGS, Setting

from .conftest import RedisServer, environment, free_port, spawn, stop, unique_prefix

TEXT = {"content-type": "text/plain"}


def serve(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, name: str = "server") -> tuple[
    subprocess.Popen[bytes], str
]:  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-level", "warning", *flags]
    return spawn(args, tmp_path / f"{name}.log", f"{base}/healthz", env=env), base


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    flags = getattr(request, "param", ())
    process, base = serve(tmp_path, *flags)
    try:
        yield base
    finally:
        stop(process)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


# -- health -------------------------------------------------------------------------------------


def test_readyz_follows_redis_and_healthz_does_not(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    process, base = serve(tmp_path, "--storage", redis.url, "--key-prefix", unique_prefix())
    try:
        assert httpx.get(f"{base}/readyz").status_code == 200
        redis.stop()
        down = httpx.get(f"{base}/readyz", timeout=10)
        assert down.status_code == 503 and down.text.startswith("not ready: "), down.text
        assert down.headers["cache-control"] == "no-store"
        assert httpx.get(f"{base}/healthz").text == "ok"  # alive: the orchestrator must not restart it
        assert httpx.put(f"{base}/v1/stream/x", headers=TEXT).status_code == 503
        redis.start()  # same port: the server reconnects by itself
        deadline = time.monotonic() + 15
        while httpx.get(f"{base}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "not ready again after Redis came back"
            time.sleep(0.2)
        assert httpx.put(f"{base}/v1/stream/x", headers=TEXT).status_code == 201
    finally:
        stop(process)
        redis.stop()


async def test_ops_app_for_host_apps_reports_draining() -> None:
    streams = DurableStreams()
    app = ops_app(streams)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/healthz")).text == "ok"
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/readyz")).status_code == 405
        assert (await client.get("/elsewhere")).status_code == 404
        streams.begin_drain()
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.text == "not ready: draining"
        assert (await client.get("/healthz")).status_code == 200
    await streams.aclose()


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_count_traffic_across_two_workers(tmp_path: Path, redis_url: str) -> None:
    process, base = serve(tmp_path, "--storage", redis_url, "--workers", "2", "--key-prefix", unique_prefix())
    appends = 40

    async def traffic() -> None:
        # A new connection per request, so that both workers serve some of them.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
            assert (await client.put("/v1/stream/m", headers=TEXT)).status_code == 201
            for n in range(appends):
                assert (await client.post("/v1/stream/m", headers=TEXT, content=b"x" * (n + 1))).status_code == 204
            assert (await client.get("/v1/stream/missing", params={"offset": "-1"})).status_code == 404
            async with client.stream("GET", "/v1/stream/m", params={"offset": "now", "live": "sse"}) as sse:
                assert sse.status_code == 200
                await asyncio.sleep(FLUSH_SECONDS * 2)  # the worker holding the reader has handed it over
                scrapes = [metric_values((await client.get("/metrics")).text) for _ in range(6)]
        for values in scrapes:  # whichever worker answered, it answered for both
            assert values[("durable_streams_live_readers", (("mode", "sse"),))] == 1.0

    try:
        asyncio.run(traffic())
        # Each worker hands its counts over within FLUSH_SECONDS: wait for the last of them.
        deadline = time.monotonic() + 10
        while True:
            values = metric_values(httpx.get(f"{base}/metrics").text)
            key = ("durable_streams_requests_total", (("operation", "append"), ("status", "204")))
            if values.get(key) == appends and values[("durable_streams_live_readers", (("mode", "sse"),))] == 0:
                break
            assert time.monotonic() < deadline, values.get(key)
            time.sleep(FLUSH_SECONDS / 2)
        for _ in range(8):
            values = metric_values(httpx.get(f"{base}/metrics", headers={"connection": "close"}).text)
            assert values[("durable_streams_requests_total", (("operation", "append"), ("status", "204")))] == appends
            assert values[("durable_streams_requests_total", (("operation", "read"), ("status", "404")))] == 1
            assert values[("durable_streams_requests_total", (("operation", "create"), ("status", "201")))] == 1
            assert values[("durable_streams_appended_messages_total", ())] == appends
            assert values[("durable_streams_appended_bytes_total", ())] == appends * (appends + 1) / 2
            assert values[("durable_streams_storage_round_trip_seconds_count", ())] > appends
            assert values[("durable_streams_live_readers", (("mode", "sse"),))] == 0.0  # the reader left
            assert values[("durable_streams_requests_total", (("operation", "sse"), ("status", "200")))] == 1
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log, log
    finally:
        stop(process)


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    process, base = serve(tmp_path, "--no-metrics")
    try:
        assert httpx.get(f"{base}/metrics").status_code == 404
    finally:
        stop(process)


def test_prometheus_hooks_hand_over_what_they_counted_with_the_status_text_and_503s_derived() -> None:
    """The hot-path hooks keep raw counts (operation and numeric status, bare totals) and the
    flush turns them into the metrics: the status as text ("none" when no response started),
    the 503s counted again as unavailable responses, appends as messages and bytes; durations
    only when asked for, and only then does the HTTP layer read the clock."""
    from prometheus_client import CollectorRegistry

    from durable_streams_asgi.ops.prometheus import PrometheusMetrics

    def values(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = {}
        for family in registry.collect():
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    async def drive(hooks: PrometheusMetrics) -> None:
        for _ in range(3):
            hooks.request("append", 503, None)
        hooks.request("append", 204, 0.002)
        hooks.request("read", 0, 0.001)
        hooks.appended(2, 150)
        hooks.appended(1, 50)
        hooks.flush()
        hooks.request("append", 204, None)  # a second flush adds to the first
        hooks.appended(1, 10)
        hooks.flush()

    plain = CollectorRegistry()
    hooks = PrometheusMetrics(plain)
    assert hooks.timed is False
    asyncio.run(drive(hooks))
    got = values(plain)
    assert got[("durable_streams_requests_total", (("operation", "append"), ("status", "503")))] == 3
    assert got[("durable_streams_requests_total", (("operation", "append"), ("status", "204")))] == 2
    assert got[("durable_streams_requests_total", (("operation", "read"), ("status", "none")))] == 1
    assert got[("durable_streams_unavailable_responses_total", ())] == 3
    assert got[("durable_streams_appended_messages_total", ())] == 4
    assert got[("durable_streams_appended_bytes_total", ())] == 210
    assert not any(name.startswith("durable_streams_request_duration") for name, _ in got)

    timed = CollectorRegistry()
    hooks = PrometheusMetrics(timed, request_durations=True)
    assert hooks.timed is True
    asyncio.run(drive(hooks))
    got = values(timed)
    assert got[("durable_streams_request_duration_seconds_count", (("operation", "append"),))] == 1
    assert got[("durable_streams_request_duration_seconds_count", (("operation", "read"),))] == 1


def test_prometheus_hooks_without_a_running_loop_hand_over_at_once() -> None:
    from prometheus_client import CollectorRegistry

    from durable_streams_asgi.ops.prometheus import PrometheusMetrics

    registry = CollectorRegistry()
    hooks = PrometheusMetrics(registry)
    hooks.request("head", 200, None)
    hooks.appended(1, 7)
    assert registry.get_sample_value("durable_streams_requests_total", {"operation": "head", "status": "200"}) == 1
    assert registry.get_sample_value("durable_streams_appended_bytes_total") == 7


# -- TLS, proxies, logs, version -----------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_tls_with_a_generated_certificate(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    port = free_port()
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-level", "warning"]
    args += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    log = tmp_path / "server.log"
    process = subprocess.Popen([sys.executable, "-m", *args], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=base, verify=trust, timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert client.get("/healthz").text == "ok"
                    break
                except httpx.TransportError:
                    assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
            created = client.put("/v1/stream/tls", headers=TEXT, content=b"secret")
            assert created.status_code == 201
            assert created.headers["location"] == f"{base}/v1/stream/tls"
            assert client.get("/v1/stream/tls", params={"offset": "-1"}).text == "secret"
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets nowhere
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).raise_for_status()
    finally:
        stop(process)


def test_proxy_headers_and_root_path(tmp_path: Path) -> None:
    """Behind a proxy that serves the server at /api, strips that prefix and says the client
    spoke HTTPS: Location is the URL the client used."""
    process, base = serve(tmp_path, "--root-path", "/api", "--forwarded-allow-ips", "127.0.0.1")
    try:
        headers = {**TEXT, "x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.9", "host": "example.com"}
        created = httpx.put(f"{base}/v1/stream/p", headers=headers)
        assert created.status_code == 201
        assert created.headers["location"] == "https://example.com/api/v1/stream/p"
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        stop(process)
    untrusted, base = serve(tmp_path, "--no-proxy-headers", name="untrusted")
    try:
        created = httpx.put(f"{base}/v1/stream/p", headers={**TEXT, "x-forwarded-proto": "https"})
        assert created.headers["location"].startswith("http://")
    finally:
        stop(untrusted)


def test_json_logs(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-format", "json"]
    process = spawn(args, tmp_path / "server.log", f"{base}/healthz")
    try:
        assert httpx.put(f"{base}/v1/stream/j", headers=TEXT).status_code == 201
    finally:
        stop(process)
    records = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    access = [r for r in records if r["logger"] == "uvicorn.access" and r.get("method") == "PUT"]
    assert access and access[0]["status"] == 201 and access[0]["path"] == "/v1/stream/j"


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "durable_streams_asgi.cli", "--version"], capture_output=True, text=True, check=True
    )
    from importlib.metadata import version

    assert result.stdout.strip() == f"durable-streams-asgi {version('durable-streams-asgi')}"


def test_environment_configures_the_server_and_flags_win(tmp_path: Path) -> None:
    env_process = None
    with environment(
        DURABLE_STREAMS_LONG_POLL_TIMEOUT="0.5",
        DURABLE_STREAMS_MAX_BODY_SIZE="10",
        DURABLE_STREAMS_CORS_ORIGINS="https://app.example",
    ):
        import os

        env_process, base = serve(tmp_path, env=dict(os.environ))
        flag_process, flag_base = serve(tmp_path, "--max-body-size", "100", env=dict(os.environ), name="flags")
    try:
        created = httpx.put(f"{base}/v1/stream/e", headers={**TEXT, "origin": "https://app.example"})
        assert created.headers["access-control-allow-origin"] == "https://app.example"
        assert httpx.post(f"{base}/v1/stream/e", headers=TEXT, content=b"x" * 11).status_code == 413
        began = time.monotonic()
        offset = created.headers["stream-next-offset"]
        waited = httpx.get(f"{base}/v1/stream/e", params={"offset": offset, "live": "long-poll"}, timeout=10)
        assert waited.status_code == 204 and time.monotonic() - began < 3
        assert httpx.put(f"{flag_base}/v1/stream/e", headers=TEXT).status_code == 201
        assert httpx.post(f"{flag_base}/v1/stream/e", headers=TEXT, content=b"x" * 11).status_code == 204
    finally:
        stop(env_process)
        stop(flag_process)


def test_a_bad_variable_is_named(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "DURABLE_STREAMS_LONG_POLL_TIMEOUT": "soon"}
    result = subprocess.run(
        [sys.executable, "-m", "durable_streams_asgi.cli", "serve"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "DURABLE_STREAMS_LONG_POLL_TIMEOUT: not a number: 'soon'" in result.stderr
    assert "Traceback" not in result.stderr


def _samples(setting: Setting) -> tuple[str, object, str, object]:
    """A variable's text and value, and a flag's text and value, both unlike the default."""
    if setting.boolean:
        return ("false", False, "--" + setting.name.replace("_", "-"), True) if setting.default else (
            "true", True, "--no-" + setting.name.replace("_", "-"), False)  # fmt: skip
    if setting.choices:
        a, b = [c for c in setting.choices if c != setting.default][:2] if len(setting.choices) > 2 else (
            setting.choices[1], setting.choices[0])  # fmt: skip
        return a, a, b, b
    if isinstance(setting.default, bool):  # pragma: no cover - booleans are flags
        raise AssertionError(setting)
    if isinstance(setting.default, int):
        return "7", 7, "9", 9
    if isinstance(setting.default, float):
        return "2.5", 2.5, "3.5", 3.5
    if isinstance(setting.default, list):
        return "a, b", ["a", "b"], "c", ["c"]
    return "from-env", "from-env", "from-flag", "from-flag"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_every_flag_reads_its_variable_and_the_flag_wins(setting: Setting) -> None:
    env_text, env_value, flag_text, flag_value = _samples(setting)
    with environment(**{setting.env: env_text}):
        assert getattr(cli._parser().parse_args(["serve"]), setting.name) == env_value
        flag = [flag_text] if setting.boolean else [setting.flag, flag_text]
        assert getattr(cli._parser().parse_args(["serve", *flag]), setting.name) == flag_value
    with environment(**{setting.env: None}):
        assert getattr(cli._parser().parse_args(["serve"]), setting.name) == setting.default
    assert setting.env in cli._parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]


def test_help_never_shows_a_secret_from_the_environment() -> None:
    with environment(DURABLE_STREAMS_JWT_SECRET="hunter2", DURABLE_STREAMS_WRITE_TOKEN="tok-123"):
        serve_help = cli._parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert "hunter2" not in serve_help and "tok-123" not in serve_help
    assert "DURABLE_STREAMS_JWT_SECRET" in serve_help


def test_serve_with_tokens_and_a_jwt_secret(tmp_path: Path) -> None:
    import jwt

    secret = "s" * 32
    process, base = serve(tmp_path, "--read-token", "reader", "--write-token", "writer", "--jwt-secret", secret)
    try:
        url = f"{base}/v1/stream/chats/1"
        missing = httpx.put(url, headers=TEXT)
        assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"]
        assert httpx.put(url, headers={**TEXT, "authorization": "Bearer reader"}).status_code == 403
        assert httpx.put(url, headers={**TEXT, "authorization": "Bearer writer"}).status_code == 201
        assert httpx.get(url, params={"offset": "-1"}, headers={"authorization": "Bearer reader"}).status_code == 200
        grant = {"ds": {"read": ["/chats/**"], "append": ["/chats/1"]}, "exp": int(time.time()) + 60}
        token = jwt.encode(grant, secret, algorithm="HS256")
        bearer = {"authorization": f"Bearer {token}"}
        assert httpx.post(url, headers={**TEXT, **bearer}, content=b"hi").status_code == 204
        assert httpx.post(f"{base}/v1/stream/chats/2", headers={**TEXT, **bearer}, content=b"x").status_code == 403
        assert httpx.delete(url, headers=bearer).status_code == 403
        expired = jwt.encode({**grant, "exp": int(time.time()) - 120}, secret, algorithm="HS256")
        refused = httpx.get(url, params={"offset": "-1"}, headers={"authorization": f"Bearer {expired}"})
        assert refused.status_code == 401 and "expired" in refused.text
        assert httpx.get(f"{base}/healthz").status_code == 200  # health checks need no token
    finally:
        stop(process)


def test_a_short_jwt_secret_is_refused_before_serving() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "durable_streams_asgi.cli", "serve", "--jwt-secret", "short"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_the_readme_documents_every_setting() -> None:
    """The README's table of the standalone server's settings names each flag and its variable."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Configuration of the standalone server", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| `--")}
    for setting in SETTINGS:
        flag = f"`--[no-]{setting.flag[2:]}`" if setting.boolean else f"`{setting.flag}`"
        assert flag in rows, flag
        assert f"`{setting.env}`" in section, setting.env
    assert len(rows) == len(SETTINGS)
