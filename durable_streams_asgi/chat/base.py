"""What both chat kinds share: their options, the lease of a chat's running answer, stop and
takeover, and serving their routes in front of any ASGI app. A kind says how its routes look
and how an answer it took over ends (:meth:`ChatApp._end`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from ..storage.base import Lease
from ..streams import DurableStreams
from .http import ChatAuthorize, ChatRoutes, chat_id_of, check, no_store
from .runtime import ChatRuntime


class ChatApp:
    """A chat kind's endpoints over ``streams``; see :class:`~.aisdk.AISDKChat` and
    :class:`~.tanstack.TanStackChat`."""

    #: Names the kind's leases (``<kind>:<path_prefix>/<chat id>``).
    kind: ClassVar[str]
    #: The default ``api`` of :meth:`routes` and :meth:`wrap`.
    default_api: ClassVar[str]

    def __init__(
        self,
        streams: DurableStreams,
        model: Any,
        *,
        path_prefix: str,
        mode: Literal["immediate", "await"] = "immediate",
        ttl: int | None,
        lease_ttl: float = 15.0,
        max_body_size: int = 4 * 1024 * 1024,
        authorize: ChatAuthorize | None = None,
        retry_for: float = 30.0,
    ) -> None:
        if mode not in ("immediate", "await"):
            raise ValueError("mode must be 'immediate' or 'await'")
        self.streams = streams
        self.model = model
        self.path_prefix = "/" + path_prefix.strip("/")
        self.mode = mode
        self.ttl = ttl
        self.max_body_size = max_body_size
        self.authorize = authorize
        self.retry_for = retry_for
        self.runtime = ChatRuntime.of(streams, lease_ttl=lease_ttl)
        self.runtime.on_orphan(f"{self.kind}:{self.path_prefix}/", self._end_orphan)

    def routes(self, api: str | None = None) -> list[Route]:
        raise NotImplementedError

    def wrap(self, app: ASGIApp, api: str | None = None) -> ASGIApp:
        """``app`` with the endpoints in front of it at ``api`` (any ASGI framework, e.g. Django)."""
        return ChatRoutes(app, self.routes(api))

    def _key(self, chat_id: str) -> str:
        return f"{self.kind}:{self.path_prefix}/{chat_id}"

    # -- stop and takeover -----------------------------------------------------------------------

    async def stop(self, request: Request) -> Response:
        chat_id = chat_id_of(request.path_params["chat_id"])
        await check(self.authorize, request, "stop", chat_id)
        await self.stop_chat(chat_id)
        return no_store(Response(status_code=204))

    async def stop_chat(self, chat_id: str) -> bool:
        """Stop the chat's running answer, whichever process runs it; False when none runs."""
        running = await self.runtime.running(self._key(chat_id))
        if running is None:
            return False
        lease = await self.runtime.take_over(running)
        await self._end(lease, orphaned=False)
        await self.runtime.end(lease)
        return True

    async def _end_orphan(self, lease: Lease) -> None:
        await self._end(lease, orphaned=True)

    async def _end(self, lease: Lease, *, orphaned: bool) -> None:
        """End the answer whose lease we took (a stop, or its writer died), writing with the
        lease's new fence so that the old writer is fenced off."""
        raise NotImplementedError
