"""The conformance target for the middleware: a trivial ASGI host wrapped by DurableStreamsMiddleware.

``python -m uvicorn tests.frameworks.middleware_host:app`` from the repository root; storage from
the environment (see env.py). The host answers every other path itself and does not speak the
lifespan protocol (it raises, as Django does), so the middleware answers the server's lifespan
and closes the storage on shutdown.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from durable_streams_asgi import DurableStreamsMiddleware

from .env import streams_from_env


async def host(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        raise ValueError(f"this host speaks HTTP only, not {scope['type']}")
    body = b"the host application"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = DurableStreamsMiddleware(host, streams=streams_from_env())
