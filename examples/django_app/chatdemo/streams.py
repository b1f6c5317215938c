"""The project's Durable Streams: one instance, served over HTTP at /v1/stream by ``asgi.py``
and written in-process by the views.

HTTP access goes through :func:`authorize`: anyone may read; creating, appending to, closing or
deleting a stream over HTTP takes a user logged in with Django's session. In-process writes (the
chat generations started by the views) do not go through the hook.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from starlette.requests import Request

from durable_streams_asgi import AccessDenied, DurableStreams, MemoryStorage, Storage

#: Where the session keeps the logged-in user's id (here, the demo username).
SESSION_USER_KEY = "chatdemo_user"
#: The chat answers' streams: written by the server only.
CHAT_STREAMS = "/chats"


def make_storage() -> Storage:
    if settings.DURABLE_STREAMS_REDIS_URL:
        from durable_streams_asgi.storage.redis import RedisStorage

        return RedisStorage.from_url(settings.DURABLE_STREAMS_REDIS_URL, key_prefix=settings.DURABLE_STREAMS_KEY_PREFIX)
    return MemoryStorage()


async def session_user(session: Any) -> str | None:
    """The user logged in with this Django session (a ``SessionStore``), or None."""
    user = await session.aget(SESSION_USER_KEY)
    return user if user in settings.DEMO_USERS else None


async def authorize(request: Request, action: str, path: str) -> bool:
    """The streams app's hook: ``request`` is a Starlette request, so Django's middleware has not
    run; the session is loaded from its cookie with Django's own session store."""
    if action == "read" or settings.DEMO_OPEN_WRITES:
        return True
    cookie = request.cookies.get(settings.SESSION_COOKIE_NAME)
    # A missing, forged or expired cookie loads as an empty session.
    session = import_module(settings.SESSION_ENGINE).SessionStore(cookie) if cookie else None
    if session is None or await session_user(session) is None:
        raise AccessDenied(401, "log in to write streams (POST /login)")
    # The cookie is SameSite=Lax, so other sites cannot write with it; this also refuses other
    # origins of the same site (a sibling subdomain), as Django's CSRF check would.
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise AccessDenied(403, "cross-origin writes are refused")
    if path == CHAT_STREAMS or path.startswith(CHAT_STREAMS + "/"):
        return False  # 403: only the server's generations write chat answers
    return True


streams = DurableStreams(
    make_storage(),
    authorize=authorize,
    long_poll_timeout=settings.DURABLE_STREAMS_LONG_POLL_TIMEOUT,
    allow_loopback_webhooks=settings.DURABLE_STREAMS_ALLOW_LOOPBACK_WEBHOOKS,
)
