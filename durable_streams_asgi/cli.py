"""Command line: ``durable-streams-asgi serve`` runs a standalone server under uvicorn.

The streams are served at ``/v1/stream/...``. Settings reach worker processes through
environment variables, because uvicorn starts each worker by importing :func:`server_app`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from starlette.types import Receive, Scope, Send

from .middleware import DurableStreamsMiddleware
from .storage.base import Storage
from .storage.memory import MemoryStorage
from .tuning import tune_gc

DEFAULT_PORT = 4437  # PROTOCOL.md section 13.1
MOUNT_PATH = "/v1/stream"

_ENV_STORAGE = "DURABLE_STREAMS_STORAGE"
_ENV_LONG_POLL = "DURABLE_STREAMS_LONG_POLL_TIMEOUT"
_ENV_SSE_DURATION = "DURABLE_STREAMS_SSE_MAX_DURATION"
_ENV_KEY_PREFIX = "DURABLE_STREAMS_KEY_PREFIX"


class UsageError(Exception):
    """A bad command-line value, reported without a traceback."""


def make_storage(spec: str, key_prefix: str = "ds:") -> Storage:
    """``memory`` or a ``redis://`` / ``rediss://`` URL."""
    if spec == "memory":
        return MemoryStorage()
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            from .storage.redis import RedisStorage
        except ImportError as exc:  # pragma: no cover - depends on the installed version
            raise UsageError(f"Redis storage is not available: {exc}") from exc
        try:
            return RedisStorage.from_url(spec, key_prefix=key_prefix)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    raise UsageError(f"unknown storage {spec!r}: use 'memory' or a redis:// URL")


async def _outside_streams(scope: Scope, receive: Receive, send: Send) -> None:
    """Everything but the streams: a health check at ``/healthz``, 404 elsewhere."""
    if scope["type"] != "http":
        return  # lifespan: answered by the middleware, which closes the storage on shutdown
    root = scope.get("root_path", "")
    path = scope["path"]
    relative = path[len(root) :] if root and path.startswith(root) else path
    status, body = (200, b"ok") if relative == "/healthz" else (404, b"not found")
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(
    storage: Storage, *, long_poll_timeout: float = 30.0, sse_max_duration: float = 60.0
) -> DurableStreamsMiddleware:
    """The standalone server: streams under ``/v1/stream`` (the same middleware host apps use),
    a health check at ``/healthz``."""
    return DurableStreamsMiddleware(
        _outside_streams,
        prefix=MOUNT_PATH,
        storage=storage,
        long_poll_timeout=long_poll_timeout,
        sse_max_duration=sse_max_duration,
    )


def server_app() -> DurableStreamsMiddleware:
    """uvicorn factory: each worker process builds its app from the environment."""
    app = build_app(
        make_storage(os.environ.get(_ENV_STORAGE, "memory"), os.environ.get(_ENV_KEY_PREFIX, "ds:")),
        long_poll_timeout=float(os.environ.get(_ENV_LONG_POLL, "30")),
        sse_max_duration=float(os.environ.get(_ENV_SSE_DURATION, "60")),
    )
    tune_gc()  # this process is ours alone: see tuning.py
    return app


def _http_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with smaller per-connection queues where this uvicorn and
    httptools allow (see uvicorn_protocol.py); otherwise uvicorn's own choice."""
    try:
        from .uvicorn_protocol import lean_protocol
    except ImportError:  # no httptools (the 'fast' extra): uvicorn falls back to h11
        return "auto"
    return lean_protocol() or "auto"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="durable-streams-asgi", description="Durable Streams server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (streams at /v1/stream)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument(
        "--storage", default="memory", help="'memory' (default) or a Redis URL such as redis://localhost:6379/0"
    )
    serve.add_argument("--key-prefix", default="ds:", help="prefix of every Redis key (default 'ds:')")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (Redis storage only for N > 1)")
    serve.add_argument(
        "--long-poll-timeout", type=_positive_float, default=30.0, help="seconds a long-poll waits (default 30)"
    )
    serve.add_argument(
        "--sse-max-duration",
        type=_positive_float,
        default=60.0,
        help="seconds before an SSE connection is closed for the client to reconnect (default 60)",
    )
    serve.add_argument(
        "--head-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds a request head may take to arrive, once its first byte has (default 10; then 408)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds a request body may take to arrive after its head (default 60; then the connection closes)",
    )
    serve.add_argument(
        "--max-head-size",
        type=int,
        default=64 * 1024,
        help="most bytes of URL and headers one request may have (default 65536; then 431)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        default=10_000,
        help="most connections and requests a worker holds at once; more get 503 (default 10000)",
    )
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        if args.max_head_size < 1024 or args.limit_concurrency < 1:
            raise UsageError("--max-head-size must be at least 1024 and --limit-concurrency at least 1")
        if args.storage == "memory" and args.workers > 1:
            raise UsageError("memory storage lives in one process: use --workers 1, or Redis storage")
        # Fail fast on a bad value, before any worker starts (nothing connects yet).
        asyncio.run(make_storage(args.storage, args.key_prefix).aclose())
    except UsageError as exc:
        print(f"durable-streams-asgi: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    os.environ[_ENV_STORAGE] = args.storage
    os.environ[_ENV_LONG_POLL] = str(args.long_poll_timeout)
    os.environ[_ENV_SSE_DURATION] = str(args.sse_max_duration)
    os.environ[_ENV_KEY_PREFIX] = args.key_prefix
    # The lean protocol's client limits, read by every worker (see uvicorn_protocol.py).
    os.environ["DURABLE_STREAMS_HEAD_TIMEOUT"] = str(args.head_timeout)
    os.environ["DURABLE_STREAMS_BODY_TIMEOUT"] = str(args.body_timeout)
    os.environ["DURABLE_STREAMS_MAX_HEAD_SIZE"] = str(args.max_head_size)
    uvicorn.run(
        "durable_streams_asgi.cli:server_app",
        factory=True,
        http=_http_protocol(),
        ws="none",  # the standalone server serves no websockets
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.log_level in ("info", "debug"),
        server_header=False,  # one header less per response, and no version advertised
        timeout_graceful_shutdown=5,
        limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=args.max_head_size,  # where uvicorn's own h11 protocol serves
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
