"""Health checks: liveness (the process serves) and readiness (it can serve streams now).

A load balancer or orchestrator sends traffic only to ready servers. Readiness asks the storage
(:meth:`~durable_streams_asgi.storage.base.Storage.ready`: on Redis, a ``PING`` and the live
notifier's pub/sub connection) and turns 503 as soon as the server drains, so that the balancer
stops sending before the process exits. Liveness never touches the storage: a Redis outage must
not make an orchestrator restart every server (they recover by themselves when Redis returns).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from ..app import streams_handler
from ..drain import Drain
from ..storage.base import Storage
from .prometheus import CONTENT_TYPE_LATEST, exposition, respond


def _parts(streams: Any) -> tuple[Storage, Drain]:
    """The storage and drain state of a ``DurableStreams``, or of an app made by
    ``durable_streams_app()``."""
    if hasattr(streams, "drain_state") and hasattr(streams, "storage"):
        return streams.storage, streams.drain_state
    handler = streams_handler(streams)
    return handler.storage, handler.drain


async def readiness(streams: Any) -> str | None:
    """None when ``streams`` can serve now, else why not (``"draining"``, or the storage's
    reason)."""
    return await _ready(*_parts(streams))


async def _ready(storage: Storage, drain: Drain) -> str | None:
    return "draining" if drain.started else await storage.ready()


def ops_app(
    streams: Any,
    *,
    metrics: bool = True,
    fallback: ASGIApp | None = None,
    health_path: str = "/healthz",
    ready_path: str = "/readyz",
    metrics_path: str = "/metrics",
) -> ASGIApp:
    """An ASGI app answering, below where it is mounted (or at the root, wrapped around nothing):

    - ``GET /healthz``: 200 ``ok`` while the process serves;
    - ``GET /readyz``: 200 ``ready``, or 503 with the reason (the storage is unreachable, the
      live notifier is not connected, the server is draining);
    - ``GET /metrics``: the Prometheus exposition (with ``metrics``; enable recording with
      :func:`~durable_streams_asgi.ops.enable_metrics`).

    Other paths go to ``fallback`` (404 without one). ``streams`` is a ``DurableStreams`` or an
    app made by ``durable_streams_app()``::

        app.mount("/ops", ops_app(streams))      # /ops/healthz, /ops/readyz, /ops/metrics
    """
    storage, drain = _parts(streams)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if fallback is not None:
                await fallback(scope, receive, send)
            return
        root = scope.get("root_path", "")
        path = scope["path"]
        relative = path[len(root) :] if root and path.startswith(root) else path
        if scope["method"] not in ("GET", "HEAD") and relative in (health_path, ready_path, metrics_path):
            await respond(send, 405, b"method not allowed")
        elif relative == health_path:
            await respond(send, 200, b"ok")
        elif relative == ready_path:
            reason = await _ready(storage, drain)
            if reason is None:
                await respond(send, 200, b"ready")
            else:
                await respond(send, 503, f"not ready: {reason}".encode())
        elif metrics and relative == metrics_path:
            await respond(send, 200, exposition(), CONTENT_TYPE_LATEST)
        elif fallback is not None:
            await fallback(scope, receive, send)
        else:
            await respond(send, 404, b"not found")

    return app
