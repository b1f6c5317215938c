"""The server side of ``@durable-streams/aisdk-transport``: durable AI SDK chats.

    chat = AISDKChat(streams, model)          # model(turn) -> async iterable of UI message chunks
    app.router.routes.extend(chat.routes("/api/chat"))   # createDurableChatTransport({api: "/api/chat"})

Routes, below the transport's ``api`` URL (``chat.routes(api)`` for Starlette and FastAPI,
``chat.wrap(app, api)`` around any ASGI app):

- ``POST {api}``: useChat's body (``id``, ``messages``, ``trigger``, ``messageId`` and the app's own
  ``body`` fields). Starts the answer as a durable generation writing a new JSON stream, and
  answers as the transport expects: ``immediate`` (201, ``Location``, ``{"streamUrl"}``) or
  ``await`` (200 once the answer is written, with ``finalOffset``). 409 while the chat has an
  answer running.
- ``GET {api}/{chat_id}/stream``: the transport's reconnect: 204 when nothing is running, else the
  running answer's stream URL, from any process.
- ``POST {api}/{chat_id}/stop``: ends the running answer, from any process: its stream gets an
  ``abort`` chunk and is closed, and the model is stopped at its next chunk.
- ``GET {api}/{chat_id}/messages``: the conversation for a page that (re)loads: ``{"messages": [...],
  "active": <stream URL or null>, "history": <stream URL>, "offset": ...}``; resume ``active``
  (useChat's ``resume``) for the answer still being written, and follow ``history`` live from
  ``offset`` to learn when the conversation changes (another tab sent a message).

Each answer's stream lives at ``<path_prefix>/<chat id>/<generation id>``; the conversation is a
JSON stream at ``<path_prefix>/<chat id>/history`` (see :mod:`.uimessages`). A process that dies
mid-answer has its answer ended by another (``error`` chunk and close) within about 1.3 times
``lease_ttl``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..generation import Generation, WriteOptions, append_with_retry, generation_response, reconnect_response
from ..jsonmode import encode_message
from ..storage.base import AppendRequest, Lease, Producer, StaleEpoch, StreamClosed, StreamNotFound
from ..streams import DurableStreams
from .base import ChatApp
from .http import (
    ChatAuthorize,
    ChatError,
    chat_id_of,
    check,
    guarded,
    json_object,
    message_list,
    no_store,
    stream_url,
)
from .runtime import PRODUCER_ID, Running
from .uimessages import History, build_message

TRIGGERS = ("submit-message", "regenerate-message")


@dataclass(frozen=True)
class ChatTurn:
    """What the model function is given for one answer."""

    chat_id: str
    #: The conversation as the client sent it (UIMessages), ending with the user's message.
    messages: list[dict[str, Any]]
    trigger: str
    #: The id the answer's assistant message gets (the ``start`` chunk carries it).
    message_id: str
    #: The rest of the request body: the app's own fields (useChat's ``body`` option).
    body: dict[str, Any] = field(default_factory=dict)
    request: Request | None = None

    @property
    def prompt(self) -> str:
        """The text of the last user message."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return "".join(
                    p.get("text", "")
                    for p in message.get("parts", [])
                    if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                )
        return ""


Model = Callable[[ChatTurn], AsyncIterable[Any]]


async def ui_message_chunks(tokens: AsyncIterable[str], message_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """Text tokens (an LLM SDK's text stream) as UI message chunks: start, one text part, finish."""
    yield {"type": "start", "messageId": message_id} if message_id else {"type": "start"}
    yield {"type": "text-start", "id": "text-1"}
    async for token in tokens:
        if token:
            yield {"type": "text-delta", "id": "text-1", "delta": token}
    yield {"type": "text-end", "id": "text-1"}
    yield {"type": "finish"}


class AISDKChat(ChatApp):
    """Durable AI SDK chats over ``streams``; see the module's documentation."""

    kind = "aisdk"
    default_api = "/api/chat"

    def __init__(
        self,
        streams: DurableStreams,
        model: Model,
        *,
        path_prefix: str = "/chats",
        mode: Literal["immediate", "await"] = "immediate",
        ttl: int | None = 7 * 24 * 3600,
        lease_ttl: float = 15.0,
        max_body_size: int = 4 * 1024 * 1024,
        authorize: ChatAuthorize | None = None,
        retry_for: float = 30.0,
    ) -> None:
        super().__init__(
            streams,
            model,
            path_prefix=path_prefix,
            mode=mode,
            ttl=ttl,
            lease_ttl=lease_ttl,
            max_body_size=max_body_size,
            authorize=authorize,
            retry_for=retry_for,
        )

    def routes(self, api: str | None = None) -> list[Route]:
        """The endpoints at ``api`` (the transport's ``api`` option; default ``/api/chat``) and
        below, for a Starlette or FastAPI app: ``app.router.routes.extend(chat.routes())``."""
        api = "/" + (api or self.default_api).strip("/")
        return [
            Route(api, guarded(self.send), methods=["POST"]),
            Route(api + "/{chat_id}/stream", guarded(self.reconnect), methods=["GET"]),
            Route(api + "/{chat_id}/stop", guarded(self.stop), methods=["POST"]),
            Route(api + "/{chat_id}/messages", guarded(self.messages), methods=["GET"]),
        ]

    # -- names -----------------------------------------------------------------------------------

    def history_path(self, chat_id: str) -> str:
        return f"{self.path_prefix}/{chat_id}/history"

    # -- the conversation ------------------------------------------------------------------------

    async def history(self, chat_id: str) -> History:
        history = History()
        try:
            async for chunk in self.streams.read(self.history_path(chat_id)):
                for record in chunk.messages:
                    history.apply(record)
                history.offset = chunk.offset
        except StreamNotFound:
            pass
        return history

    async def _ensure_history(self, chat_id: str) -> str:
        path = self.history_path(chat_id)
        await self.streams.create(path, content_type="application/json", ttl=self.ttl)
        return path

    async def _record(self, chat_id: str, record: dict[str, Any]) -> None:
        await self.streams.append_json(await self._ensure_history(chat_id), record)

    async def _chunks_of(self, path: str) -> list[Any]:
        """What an answer's stream holds (the truth, whoever wrote it)."""
        try:
            return [item async for chunk in self.streams.read(path) for item in chunk.messages]
        except StreamNotFound:
            return []

    async def _answer_of(self, running: Running, chunks: list[Any] | None = None) -> dict[str, Any]:
        """The assistant message of a generation, folded from its stream."""
        return build_message(running.details.get("message_id", ""), chunks or await self._chunks_of(running.path))

    # -- routes ----------------------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        body = await json_object(request, self.max_body_size)
        chat_id = chat_id_of(body.pop("id", None))
        messages = message_list(body.pop("messages", None))
        trigger = body.pop("trigger", "submit-message")
        if trigger not in TRIGGERS:
            raise ChatError(400, f'"trigger" must be one of {", ".join(TRIGGERS)}')
        body.pop("messageId", None)
        await check(self.authorize, request, "send", chat_id)
        generation, path = await self.start(chat_id, messages, trigger, body, request)
        url = stream_url(self.streams, request, path)
        if self.mode == "immediate":
            response = JSONResponse({"streamUrl": url}, status_code=201)
            response.headers["Location"] = url
            response.headers["Access-Control-Expose-Headers"] = "Location"
            return no_store(response)
        return no_store(generation_response(generation, url, mode="await"))

    async def start(
        self,
        chat_id: str,
        messages: list[dict[str, Any]],
        trigger: str = "submit-message",
        body: dict[str, Any] | None = None,
        request: Request | None = None,
    ) -> tuple[Generation, str]:
        """Start an answer (what ``POST`` does, for a host app's own route): the generation and
        its stream's path. Raises :class:`ChatError` (409) when one is running."""
        message_id = f"msg-{uuid.uuid4().hex}"
        path = f"{self.path_prefix}/{chat_id}/{uuid.uuid4().hex}"
        details = {"path": path, "message_id": message_id}
        lease = await self.runtime.begin(self._key(chat_id), details)
        if lease is None:
            raise ChatError(409, "this chat has an answer being written; stop it first")
        try:
            # Read with the lease held: the previous answer, recorded before its lease was
            # released, is in it.
            keep = (await self.history(chat_id)).common_prefix(messages)
            await self._record(chat_id, {"turn": path, "keep": keep, "messages": messages[keep:]})
            turn = ChatTurn(chat_id, messages, trigger, message_id, body or {}, request)
            # The stream is closed after the answer is in the history (not with the last chunk):
            # a reader that sees the end and asks for the conversation finds the answer there.
            options = WriteOptions(
                content_type="application/json",
                producer_id=PRODUCER_ID,
                epoch=lease.fence,
                retry_for=self.retry_for,
                close=False,
            )

            async def finalize(generation: Generation) -> None:
                try:
                    if generation.outcome != "stopped":  # a stop records the answer and closes
                        running = Running(lease, path, details)
                        await self._record(chat_id, {"answer": path, "message": await self._answer_of(running)})
                        await self._close(path)
                finally:
                    await self.runtime.end(lease)

            generation = await self.streams.start_generation(
                path, self._chunks(turn), options=options, ttl=self.ttl, finalize=finalize
            )
        except BaseException:
            await self.runtime.end(lease)
            raise
        return generation, path

    async def _chunks(self, turn: ChatTurn) -> AsyncIterator[Any]:
        """The model's chunks, with the answer's message id on its ``start`` chunk (prepended when
        the model sends none), so that every reader and the history agree on it."""
        first = True
        async for chunk in self.model(turn):
            if isinstance(chunk, str):
                raise TypeError("the model yields UI message chunks (dicts); wrap text with ui_message_chunks()")
            if first:
                first = False
                if isinstance(chunk, dict) and chunk.get("type") == "start":
                    chunk = {**chunk, "messageId": turn.message_id}
                else:
                    yield {"type": "start", "messageId": turn.message_id}
            yield chunk

    async def reconnect(self, request: Request) -> Response:
        chat_id = chat_id_of(request.path_params["chat_id"])
        await check(self.authorize, request, "read", chat_id)
        running = await self.runtime.running(self._key(chat_id))
        return no_store(reconnect_response(stream_url(self.streams, request, running.path) if running else None))

    async def messages(self, request: Request) -> Response:
        chat_id = chat_id_of(request.path_params["chat_id"])
        await check(self.authorize, request, "read", chat_id)
        # The lease first, then the history: an answer that ends in between is in the history,
        # and is then not reported as active.
        running = await self.runtime.running(self._key(chat_id))
        history_path = await self._ensure_history(chat_id)
        history = await self.history(chat_id)
        active = None
        if running is not None and not (history.turn == running.path and history.answered):
            active = stream_url(self.streams, request, running.path)
        return no_store(
            JSONResponse(
                {
                    "messages": history.messages,
                    "active": active,
                    # Follow this stream from this offset (live) to learn when the conversation
                    # changes: another tab sent a message, an answer ended.
                    "history": stream_url(self.streams, request, history_path),
                    "offset": history.offset,
                }
            )
        )

    async def _end(self, lease: Lease, *, orphaned: bool) -> None:
        """``abort`` (a stop) or ``error`` (its writer died), its answer into the history, then
        the close. An answer whose writer died after its last chunk (``finish``) but before the
        close gets no record, only the close."""
        record = (
            {"type": "error", "errorText": "the server writing this answer stopped"} if orphaned else {"type": "abort"}
        )
        running = Running.of(lease)
        chunks = await self._chunks_of(running.path)
        if not (chunks and isinstance(chunks[-1], dict) and chunks[-1].get("type") in ("finish", "abort", "error")):
            producer = Producer(PRODUCER_ID, lease.fence, 0)
            request = AppendRequest("application/json", [encode_message(record)], producer=producer)
            try:
                await append_with_retry(self.streams.storage, running.path, request, self.retry_for)
            except (StreamClosed, StaleEpoch, StreamNotFound):
                return  # it ended by itself meanwhile (or expired, or a later stop took over)
            chunks.append(record)
        chat_id = running.path[len(self.path_prefix) + 1 :].split("/", 1)[0]
        await self._record(chat_id, {"answer": running.path, "message": await self._answer_of(running, chunks)})
        await self._close(running.path)

    async def _close(self, path: str) -> None:
        with contextlib.suppress(StreamNotFound):  # expired meanwhile: nothing to close
            await append_with_retry(self.streams.storage, path, AppendRequest(None, [], close=True), self.retry_for)
