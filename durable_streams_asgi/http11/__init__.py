"""The standalone server's HTTP/1.1 protocol: httptools parsing, behind uvicorn's Server.

uvicorn stays in charge of what a server process is (sockets, workers, lifespan, signals,
graceful shutdown, the once-a-second ``date`` header); this module is what runs per connection
and per request, in place of uvicorn's httptools protocol. It exists for cost, measured without
sockets (request bytes fed in-process, 2026-12-03): uvicorn's protocol spends 14-17 us per small
request before the application runs, on a request-cycle object of twenty attributes and an
``asyncio.Event``, a keep-alive timer made and cancelled per request, two regular-expression
checks per response header, and a head written apart from its body. Here one small object per
request holds what the request needs, the connection keeps one timer for every limit, response
header lines are checked once and remembered, a head goes out with its body in one write, and an
application that knows it is answering whole (ours) can do so in one call (:meth:`Exchange.respond`).

It also bounds what one client can hold, which uvicorn does not: a request head must arrive
whole within ``head_timeout`` seconds (from the connection's first byte, or the first byte of the
next request) and within ``max_head_size`` bytes (else 408 or 431, and the connection closes), a
request body within ``body_timeout`` seconds of its head, and a kept-alive connection closes after
uvicorn's ``timeout_keep_alive`` idle seconds.

It takes from uvicorn only what uvicorn hands every protocol class it is given (``http=``): the
config (``loaded_app``, ``root_path``, ``timeout_keep_alive``, ``limit_concurrency``,
``access_log``) and the server state (``connections``, ``tasks``, ``default_headers``,
``total_requests``), checked by :func:`protocol_status` before the server starts.
"""

from __future__ import annotations

import asyncio

import httptools

from .connection import ClientLimits, HTTP11Protocol, client_limits
from .exchange import Exchange

__all__ = ["ClientLimits", "Exchange", "HTTP11Protocol", "client_limits", "protocol_status"]


async def _nothing(scope: object, receive: object, send: object) -> None:  # the check's app
    return None


# What uvicorn must hand the protocol; checked before the server starts (protocol_status()).
_CONFIG_ATTRIBUTES = ("loaded", "loaded_app", "root_path", "timeout_keep_alive", "limit_concurrency", "access_log")
_STATE_ATTRIBUTES = ("connections", "tasks", "default_headers", "total_requests")


def _off(why: str) -> str:
    return (
        f"durable-streams-asgi: its HTTP/1.1 protocol is off: {why}; uvicorn's own protocol serves, "
        "which does not enforce --head-timeout, --body-timeout or --max-head-size (a slow or oversized "
        "request head is held as long as the client likes). Please report it, with this uvicorn's version."
    )


def protocol_status() -> tuple[type[asyncio.Protocol] | None, str]:
    """This protocol class and a line saying so, or None and why uvicorn's must serve instead."""
    import uvicorn
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    try:
        config = Config(app=_nothing, log_config=None, lifespan="off")
        config.load()
        state = ServerState()
    except Exception as exc:  # a changed constructor
        return None, _off(
            f"uvicorn {uvicorn.__version__}'s Config or ServerState changed ({type(exc).__name__}: {exc})"
        )
    missing = [f"Config.{n}" for n in _CONFIG_ATTRIBUTES if not hasattr(config, n)]
    missing += [f"ServerState.{n}" for n in _STATE_ATTRIBUTES if not hasattr(state, n)]
    if missing:
        return None, _off(f"uvicorn {uvicorn.__version__} no longer has {', '.join(missing)}")
    return HTTP11Protocol, f"HTTP/1.1 protocol: durable_streams_asgi.http11 (httptools {httptools.__version__})"
