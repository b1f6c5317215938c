"""What a host application configures: options, the authorize hook, and the CORS header lists."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

#: ``authorize(request, action, path)``: sync or async; ``action`` is one of ``read``, ``create``,
#: ``append``, ``close``, ``delete``, or ``subscribe`` (the subscription API, with the path
#: ``/__ds/subscriptions/<id>``). Return True (or None) to allow, False to answer 403, or raise
#: :class:`AccessDenied` to choose the status (401 to ask for credentials) and message.
Authorize = Callable[[Request, str, str], "bool | Awaitable[bool | None] | None"]


class AccessDenied(Exception):
    """Raised by an ``authorize`` hook to refuse a request with ``status`` (401 or 403)."""

    def __init__(self, status: int = 403, message: str = "forbidden", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


EXPOSED_HEADERS = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, "
    "Stream-Expires-At, ETag, Location, Content-Type, Producer-Epoch, Producer-Seq, "
    "Producer-Expected-Seq, Producer-Received-Seq, stream-sse-data-encoding, Retry-After"
)
ALLOWED_HEADERS = (
    "Content-Type, Authorization, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Seq, "
    "Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, "
    "Producer-Id, Producer-Epoch, Producer-Seq, Cache-Control, Last-Event-ID"
)
ALLOWED_METHODS = "GET, HEAD, PUT, POST, DELETE, OPTIONS"


@dataclass(frozen=True)
class Options:
    """Server behaviour that a host application may tune. See ``durable_streams_app``."""

    long_poll_timeout: float = 30.0
    sse_max_duration: float = 60.0
    sse_keepalive: float = 15.0
    max_body_size: int = 16 * 1024 * 1024
    max_read_bytes: int = 4 * 1024 * 1024
    max_messages: int = 10_000
    cors_origins: str | Sequence[str] = "*"
    cache_visibility: Literal["public", "private"] = "public"
    authorize: Authorize | None = None
    #: Serve the subscription API under ``__ds/`` and wake subscriptions on this process's appends.
    subscriptions: bool = True
    #: Let webhooks go to loopback addresses over http: development and tests only.
    allow_loopback_webhooks: bool = False
