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

from .app import durable_streams_app, streams_handler
from .storage.base import Storage
from .storage.memory import MemoryStorage

DEFAULT_PORT = 4437  # PROTOCOL.md section 13.1
MOUNT_PATH = "/v1/stream"
_MOUNT_PREFIX = MOUNT_PATH + "/"

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


class StandaloneServer:
    """The standalone server: streams under ``/v1/stream``, a health check at ``/healthz``.

    A plain ASGI dispatcher rather than a Starlette router: with one prefix to match, routing
    layers would only add cost to every append.
    """

    def __init__(self, storage: Storage, *, long_poll_timeout: float = 30.0, sse_max_duration: float = 60.0) -> None:
        self.storage = storage
        self.streams = durable_streams_app(
            storage, long_poll_timeout=long_poll_timeout, sse_max_duration=sse_max_duration
        )
        self._handler = streams_handler(self.streams)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            path = scope["path"]
            relative = path[len(root) :] if root and path.startswith(root) else path
            if relative.startswith(MOUNT_PATH) and (
                len(relative) == len(MOUNT_PATH) or relative[len(MOUNT_PATH)] == "/"
            ):
                scope["root_path"] = root + MOUNT_PATH
                await self._handler(scope, receive, send)
            else:
                status, body = (200, b"ok") if relative == "/healthz" else (404, b"not found")
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.storage.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return


def build_app(storage: Storage, *, long_poll_timeout: float = 30.0, sse_max_duration: float = 60.0) -> StandaloneServer:
    return StandaloneServer(storage, long_poll_timeout=long_poll_timeout, sse_max_duration=sse_max_duration)


def server_app() -> StandaloneServer:
    """uvicorn factory: each worker process builds its app from the environment."""
    return build_app(
        make_storage(os.environ.get(_ENV_STORAGE, "memory"), os.environ.get(_ENV_KEY_PREFIX, "ds:")),
        long_poll_timeout=float(os.environ.get(_ENV_LONG_POLL, "30")),
        sse_max_duration=float(os.environ.get(_ENV_SSE_DURATION, "60")),
    )


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
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
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
    uvicorn.run(
        "durable_streams_asgi.cli:server_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.log_level in ("info", "debug"),
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
