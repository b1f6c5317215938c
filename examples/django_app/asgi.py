"""The ASGI entry point of the example: ``uvicorn asgi:application``, run from this folder.

Requests for ``/v1/stream`` and below go to the Durable Streams app; everything else goes to
Django. Django's ASGI handler speaks only HTTP, so the lifespan protocol is answered here: on
shutdown, running generations get to finish and the storage's connections are closed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from starlette.types import Receive, Scope, Send

# Importable from anywhere (``uvicorn --app-dir``, tests): the project package sits next to this file.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatdemo.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

# First, so that Django is set up (django.setup()) before anything reads its settings.
django_application = get_asgi_application()

from chatdemo.streams import streams  # noqa: E402

STREAMS_PREFIX = streams.mount_path  # "/v1/stream"


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        root = scope.get("root_path", "")
        path = scope["path"]
        # ASGI servers put root_path in front of path (and Starlette expects them to); tolerate
        # those that do not.
        relative = path[len(root) :] if root and path.startswith(root) else path
        if relative == STREAMS_PREFIX or relative.startswith(STREAMS_PREFIX + "/"):
            # Like Starlette's Mount: the mounted app gets the full path and its mount point as
            # root_path, and strips it itself.
            await streams.app({**scope, "path": root + relative, "root_path": root + STREAMS_PREFIX}, receive, send)
        else:
            await django_application(scope, receive, send)
    elif scope["type"] == "websocket":
        # Django without Channels has no websockets: refuse the handshake (servers answer 403).
        await receive()
        await send({"type": "websocket.close", "code": 1000})
    else:
        raise ValueError(f"unsupported ASGI scope type {scope['type']!r}")


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # Nothing to do: storages connect on first use.
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                # Lets running generations finish (for up to shutdown_timeout seconds, then they
                # are interrupted with an error record), then closes the storage.
                await streams.aclose()
            except Exception as exc:
                await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            else:
                await send({"type": "lifespan.shutdown.complete"})
            return
