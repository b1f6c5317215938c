"""The ASGI entry point of the example: ``uvicorn asgi:application``, run from this folder.

Django serves its own views; in front of it, ``DurableStreamsMiddleware`` serves the Durable
Streams protocol at ``/v1/stream`` (and answers the lifespan protocol, which Django's handler does
not speak: on shutdown running answers finish and the storage's connections close), and
``chat.wrap`` serves the AI SDK chat endpoints at ``/api/chat``.
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

from chatdemo.chat import chat  # noqa: E402
from chatdemo.streams import streams  # noqa: E402

from durable_streams_asgi import DurableStreamsMiddleware  # noqa: E402

served = chat.wrap(DurableStreamsMiddleware(django_application, streams=streams), "/api/chat")


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        # Django without Channels has no websockets: refuse the handshake (servers answer 403).
        await receive()
        await send({"type": "websocket.close", "code": 1000})
        return
    await served(scope, receive, send)
