"""Command line: ``durable-streams-asgi serve`` runs a standalone server under uvicorn.

The streams are served at ``/v1/stream/...``, with ``/healthz``, ``/readyz`` and ``/metrics``
beside them. Every flag also reads an environment variable, ``DURABLE_STREAMS_<FLAG>``
(``--long-poll-timeout`` reads ``DURABLE_STREAMS_LONG_POLL_TIMEOUT``); a flag given on the command
line wins over its variable. The settings reach worker processes (uvicorn starts each by
importing :func:`server_app`) as one JSON document in ``_DURABLE_STREAMS_SERVE``, so the
variables a user set are never overwritten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from .middleware import DurableStreamsMiddleware
from .options import Authorize
from .settings import ENV_PREFIX, SETTINGS, UsageError, add_settings, check, make_storage
from .storage.base import Storage, StorageError
from .streams import DurableStreams
from .tuning import tune_gc

__all__ = ["SETTINGS", "UsageError", "build_app", "main", "make_storage", "server_app"]

DEFAULT_PORT = 4437  # PROTOCOL.md section 13.1
MOUNT_PATH = "/v1/stream"

# The resolved settings, for worker processes (internal: not a setting's variable).
_ENV_RESOLVED = "_DURABLE_STREAMS_SERVE"

logger = logging.getLogger("durable_streams_asgi")


def version() -> str:
    try:
        return metadata.version("durable-streams-asgi")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


def build_app(
    storage: Storage,
    *,
    long_poll_timeout: float = 30.0,
    sse_max_duration: float = 60.0,
    metrics: bool = True,
    authorize: Authorize | None = None,
    shutdown_timeout: float = 8.0,
    **options: Any,
) -> DurableStreamsMiddleware:
    """The standalone server: streams under ``/v1/stream`` (the same middleware host apps use),
    health checks at ``/healthz`` and ``/readyz``, and metrics at ``/metrics``."""
    from .ops import enable_metrics, ops_app

    streams = DurableStreams(
        storage,
        mount_path=MOUNT_PATH,
        long_poll_timeout=long_poll_timeout,
        sse_max_duration=sse_max_duration,
        authorize=authorize,
        shutdown_timeout=shutdown_timeout,
        **options,
    )
    if metrics:
        enable_metrics()
        streams.add_service(_WorkerMetrics())
    return DurableStreamsMiddleware(ops_app(streams, metrics=metrics), prefix=MOUNT_PATH, streams=streams)


class _WorkerMetrics:
    """Takes a stopping worker's live gauges out of the multiprocess sums."""

    def start(self) -> None:
        pass

    async def aclose(self) -> None:
        from .ops import mark_process_dead

        mark_process_dead()


def _authorize(config: dict[str, Any]) -> Authorize | None:
    """The hook the auth settings ask for: tokens, JWTs, or either."""
    if not (config["read_token"] or config["write_token"] or config["jwt_secret"] or config["jwt_jwks_url"]):
        return None
    from . import auth

    hooks: list[Authorize] = []
    if config["read_token"] or config["write_token"]:
        hooks.append(auth.TokenAuth(read_tokens=config["read_token"], write_tokens=config["write_token"]))
    if config["jwt_secret"] or config["jwt_jwks_url"]:
        hooks.append(
            auth.JWTAuth(
                secret=config["jwt_secret"] or None,
                jwks_url=config["jwt_jwks_url"] or None,
                audience=config["jwt_audience"] or None,
                issuer=config["jwt_issuer"] or None,
                claim=config["jwt_claim"],
            )
        )
    return hooks[0] if len(hooks) == 1 else auth.any_of(*hooks)


def app_from_settings(config: dict[str, Any]) -> DurableStreamsMiddleware:
    return build_app(
        make_storage(config["storage"], config["key_prefix"]),
        long_poll_timeout=config["long_poll_timeout"],
        sse_max_duration=config["sse_max_duration"],
        max_body_size=config["max_body_size"],
        max_messages=config["max_messages"],
        cors_origins=config["cors_origins"] if config["cors_origins"] != ["*"] else "*",
        cache_visibility=config["cache_visibility"],
        authorize=_authorize(config),
        metrics=config["metrics"],
        allow_loopback_webhooks=config["allow_loopback_webhooks"],
        # Generations get most of the drain's bound; closing the rest takes the remainder.
        shutdown_timeout=max(config["drain_timeout"] - 2.0, config["drain_timeout"] / 2),
    )


def server_app() -> DurableStreamsMiddleware:
    """uvicorn factory: each worker process builds its app from the resolved settings (or, when
    started by uvicorn directly, from the environment and the defaults)."""
    resolved = os.environ.get(_ENV_RESOLVED)
    config = json.loads(resolved) if resolved else vars(_parser().parse_args(["serve"]))
    app = app_from_settings(config)
    tune_gc()  # this process is ours alone: see tuning.py
    return app


def _http_protocol() -> type[asyncio.Protocol] | str:
    """This package's HTTP/1.1 protocol (http11/), which enforces the client limits; where
    httptools is missing, or uvicorn no longer hands a protocol what it needs, uvicorn's own
    choice, with a warning that says which limits are then not enforced."""
    try:
        from .http11 import protocol_status
    except ImportError as exc:  # no httptools (the 'fast' extra): uvicorn falls back to h11
        logger.warning(
            "httptools is not installed (%s): uvicorn serves with h11, and --head-timeout, --body-timeout and "
            "--max-head-size are not enforced; pip install 'durable-streams-asgi[fast]'",
            exc,
        )
        return "auto"
    protocol, why = protocol_status()
    if protocol is None:
        logger.warning("%s", why)
    return protocol or "auto"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="durable-streams-asgi", description="Durable Streams server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the server (streams at /v1/stream)",
        description=(
            "Run the server: streams at /v1/stream, /healthz (liveness), /readyz (readiness), /metrics "
            f"(Prometheus). Every flag also reads the environment variable {ENV_PREFIX}<FLAG> (for "
            f"--long-poll-timeout: {ENV_PREFIX}LONG_POLL_TIMEOUT); a flag on the command line wins."
        ),
    )
    add_settings(serve)
    rotate = sub.add_parser(
        "rotate-webhook-key",
        help="retire the webhook signing key and make a new one (Redis storage)",
        description=(
            "Retire the key that signs subscription webhooks and make a new one, for every server on "
            "this storage within 30 s. The old public key stays in the JWK Set for 15 minutes, so "
            "receivers verify webhooks signed before the change. Prints the new key's id."
        ),
    )
    add_settings(rotate, ("storage", "key_prefix"))
    return parser


def rotate_webhook_key(config: dict[str, Any]) -> int:
    if config["storage"] == "memory":
        print("durable-streams-asgi: memory storage lives in the server's process: rotate in process", file=sys.stderr)
        return 2
    from .subscriptions.keys import Keys

    async def rotate() -> str:
        storage = make_storage(config["storage"], config["key_prefix"])
        try:
            return await Keys(storage).rotate()
        finally:
            await storage.aclose()

    try:
        print(asyncio.run(rotate()))
    except StorageError as exc:
        print(f"durable-streams-asgi: the storage is not reachable: {exc}", file=sys.stderr)
        return 1
    return 0


def _multiprocess_metrics(config: dict[str, Any]) -> None:
    """Several workers share one /metrics through prometheus_client's multiprocess mode: a
    directory every worker writes to, made empty here (unless the user chose one)."""
    if not config["metrics"] or config["workers"] < 2:
        return
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # the user's own: they clear it between runs, as prometheus_client documents
    directory = tempfile.mkdtemp(prefix="durable-streams-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    import atexit

    atexit.register(shutil.rmtree, directory, True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        config = vars(args)
        if args.command == "rotate-webhook-key":
            return rotate_webhook_key(config)
        check(config)
        # Fail fast on a bad value, before any worker starts (nothing connects yet).
        asyncio.run(make_storage(config["storage"], config["key_prefix"]).aclose())
        _authorize(config)
    except UsageError as exc:
        print(f"durable-streams-asgi: {exc}", file=sys.stderr)
        return 2
    except (ImportError, ValueError) as exc:  # an auth setting its library refuses (a short secret)
        print(f"durable-streams-asgi: {exc}", file=sys.stderr)
        return 2

    import logging.config

    import uvicorn

    from .ops.logs import log_config

    level = config["log_level"]
    # Configured here as uvicorn will, so that what is logged before it starts looks the same.
    logging.config.dictConfig(log_config(level, config["log_format"]))

    _multiprocess_metrics(config)  # before anything imports prometheus_client in this process
    os.environ[_ENV_RESOLVED] = json.dumps(config)
    # The HTTP/1.1 protocol's client limits, read by every worker (see http11/).
    os.environ[f"{ENV_PREFIX}HEAD_TIMEOUT"] = str(config["head_timeout"])
    os.environ[f"{ENV_PREFIX}BODY_TIMEOUT"] = str(config["body_timeout"])
    os.environ[f"{ENV_PREFIX}MAX_HEAD_SIZE"] = str(config["max_head_size"])
    ssl: dict[str, Any] = {}
    if config["ssl_certfile"]:
        ssl = {"ssl_certfile": config["ssl_certfile"], "ssl_keyfile": config["ssl_keyfile"] or None}
        if config["ssl_keyfile_password"]:
            ssl["ssl_keyfile_password"] = config["ssl_keyfile_password"]
    uvicorn.run(
        "durable_streams_asgi.cli:server_app",
        factory=True,
        http=_http_protocol(),
        ws="none",  # the standalone server serves no websockets
        host=config["host"],
        port=config["port"],
        workers=config["workers"],
        log_level=level,
        log_config=log_config(level, config["log_format"]),
        access_log=config["access_log"] and level in ("info", "debug"),
        server_header=False,  # one header less per response, and no version advertised
        # The drain (drain.py) ends live reads at once; this bounds the rest.
        timeout_graceful_shutdown=config["drain_timeout"],
        limit_concurrency=config["limit_concurrency"],
        h11_max_incomplete_event_size=config["max_head_size"],  # where uvicorn's own h11 protocol serves
        proxy_headers=config["proxy_headers"],
        forwarded_allow_ips=config["forwarded_allow_ips"],
        root_path=config["root_path"],
        **ssl,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
