"""What the chat endpoints share: request bodies read within a limit, chat ids checked, clear
4xx answers, stream URLs as the client addresses them."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..storage.base import StorageUnavailable
from ..streams import DurableStreams

CHAT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

#: ``authorize(request, action, chat_id)``: ``send``, ``read`` or ``stop``; True allows, False
#: answers 403 (sync or async).
ChatAuthorize = Callable[[Request, str, str], "bool | Awaitable[bool]"]


class ChatError(Exception):
    """A request the chat endpoints refuse: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(exc: ChatError) -> Response:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


UNAVAILABLE = ChatError(503, "storage unavailable, try again", {"Retry-After": "1"})


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Maps a refused request to its 4xx, and an unavailable storage to 503 with Retry-After."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ChatError as exc:
            return error_response(exc)
        except StorageUnavailable:
            return error_response(UNAVAILABLE)

    return endpoint


def chat_id_of(value: Any) -> str:
    if not isinstance(value, str) or not CHAT_ID.fullmatch(value):
        raise ChatError(400, "chat id must be 1 to 128 letters, digits, '-' or '_'")
    return value


async def json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object body, read up to ``max_bytes`` (413 past it)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ChatError(415, "send application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ChatError(413, f"body larger than {max_bytes} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise ChatError(413, f"body larger than {max_bytes} bytes")
    except ClientDisconnect as exc:
        raise ChatError(400, "the request body ended early") from exc
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ChatError(400, "the body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise ChatError(400, "the body must be a JSON object")
    return value


def message_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise ChatError(400, '"messages" must be a non-empty list of message objects')
    for message in value:
        if "id" in message and not isinstance(message["id"], str):
            raise ChatError(400, "a message id must be a string")
        if not isinstance(message.get("role", "user"), str):
            raise ChatError(400, "a message role must be a string")
        if not isinstance(message.get("parts", []), list):
            raise ChatError(400, 'a message\'s "parts" must be a list')
    return value


async def check(authorize: ChatAuthorize | None, request: Request, action: str, chat_id: str) -> None:
    if authorize is None:
        return
    allowed = authorize(request, action, chat_id)
    if inspect.isawaitable(allowed):
        allowed = await allowed
    if not allowed:
        raise ChatError(403, "not allowed")


def stream_url(streams: DurableStreams, request: Request, path: str) -> str:
    """The stream's absolute URL: the request's origin, the host app's root path (above any mount
    of the chat app) and the streams' mount path."""
    # Starlette's Mount keeps the host app's own root path (a proxy prefix) as app_root_path.
    root = request.scope.get("app_root_path", request.scope.get("root_path", "")) or ""
    origin = f"{request.url.scheme}://{request.url.netloc}"
    return streams.url_for(origin + root, path)


def no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


class RawEndpoint:
    """An ASGI endpoint for a ``Route`` (Starlette calls plain functions with a ``Request``)."""

    def __init__(self, handler: ASGIApp) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class ChatRoutes:
    """Chat endpoints in front of any ASGI app: a request that matches one of ``routes`` is
    served, everything else (other paths, other methods' 405s excepted, websockets, lifespan)
    goes to ``app`` untouched."""

    def __init__(self, app: ASGIApp, routes: list[Route]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                match, child = route.matches(scope)
                if match is not Match.NONE:
                    scope.update(child)
                    await route.handle(scope, receive, send)
                    return
        await self.app(scope, receive, send)
