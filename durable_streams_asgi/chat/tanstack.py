"""The server side of ``@durable-streams/tanstack-ai-transport``: a TanStack AI chat session.

    chat = TanStackChat(streams, model)       # model(turn) -> async iterable of AG-UI chunks
    app.router.routes.extend(chat.routes("/api/tanstack"))   # durableStreamConnection(...)

One JSON session stream per chat (``<path_prefix>/<chat id>``) holds the whole conversation as
AG-UI chunks: each user message echoed (``TEXT_MESSAGE_START``/``CONTENT``/``END``, role
``user``), then the model's run. The stream stays open for the next turn. Routes, relative to the
``api`` URL (``chat.routes(api)`` for Starlette and FastAPI, ``chat.wrap(app, api)`` around any
ASGI app):

- ``POST {api}/{chat_id}``: ``{messages, data}``; appends the new trailing user message(s), then pipes
  the model's chunks in from a durable generation; 202 at once (``await`` mode: 200 at the end).
  409 while the chat has a run going.
- ``GET {api}/{chat_id}/stream``: the session stream over the Durable Streams protocol (``offset``,
  ``live``, ``cursor`` as the client sends them): the connection's ``readUrl``.
- ``POST {api}/{chat_id}/stop``: ends the running answer, from any process (``TEXT_MESSAGE_END`` and
  ``RUN_ERROR`` with code ``aborted``); the model stops at its next chunk.
- ``GET {api}/{chat_id}/snapshot``: ``{"messages", "offset"}``, the conversation and the offset to
  resume from, for server-side rendering (``initialOffset`` of the connection).

A run whose process died is ended by another with ``RUN_ERROR`` (code ``orphaned``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..generation import Generation, WriteOptions, append_with_retry
from ..jsonmode import encode_message
from ..storage.base import (
    AppendRequest,
    Lease,
    Producer,
    StaleEpoch,
    StorageUnavailable,
    StreamClosed,
    StreamNotFound,
)
from ..streams import DurableStreams
from .base import ChatApp
from .http import (
    UNAVAILABLE,
    ChatAuthorize,
    ChatError,
    RawEndpoint,
    chat_id_of,
    check,
    error_response,
    guarded,
    json_object,
    message_list,
    no_store,
)
from .runtime import PRODUCER_ID, Running


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class TanStackTurn:
    """What the model function is given for one run."""

    chat_id: str
    messages: list[dict[str, Any]]
    data: Any
    #: Ids the run's chunks should carry (the stop and takeover chunks use them too).
    message_id: str
    run_id: str
    request: Request | None = field(default=None, compare=False)

    @property
    def prompt(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message)
        return ""


TanStackModel = Callable[[TanStackTurn], AsyncIterable[Any]]


def message_text(message: dict[str, Any]) -> str:
    parts = message.get("parts")
    if not isinstance(parts, list):
        return message.get("content", "") if isinstance(message.get("content"), str) else ""
    texts = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "text":
            value = part.get("content", part.get("text"))
            texts.append(value if isinstance(value, str) else "")
    return "".join(texts)


async def tanstack_chunks(tokens: AsyncIterable[str], turn: TanStackTurn) -> AsyncIterator[dict[str, Any]]:
    """Text tokens as one AG-UI run: ``RUN_STARTED``, one assistant text message, ``RUN_FINISHED``."""
    ids = {"threadId": turn.chat_id, "runId": turn.run_id}
    yield {"type": "RUN_STARTED", **ids, "timestamp": _now_ms()}
    yield {"type": "TEXT_MESSAGE_START", "messageId": turn.message_id, "role": "assistant", "timestamp": _now_ms()}
    async for token in tokens:
        if token:
            yield {"type": "TEXT_MESSAGE_CONTENT", "messageId": turn.message_id, "delta": token, "timestamp": _now_ms()}
    yield {"type": "TEXT_MESSAGE_END", "messageId": turn.message_id, "timestamp": _now_ms()}
    yield {"type": "RUN_FINISHED", **ids, "finishReason": "stop", "timestamp": _now_ms()}


def echo_chunks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A client's message as it goes into the session stream (what every reader replays)."""
    message_id = message.get("id") if isinstance(message.get("id"), str) and message.get("id") else uuid.uuid4().hex
    role = message.get("role") if message.get("role") in ("user", "assistant", "system", "tool") else "user"
    text = message_text(message)
    stamp = _now_ms()
    chunks = [
        {"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": role, "model": "client", "timestamp": stamp}
    ]
    if text:
        chunks.append({"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": text, "model": "client",
                       "timestamp": stamp})  # fmt: skip
    chunks.append({"type": "TEXT_MESSAGE_END", "messageId": message_id, "model": "client", "timestamp": stamp})
    return chunks


def apply_chunks(messages: list[dict[str, Any]], chunks: list[Any]) -> list[dict[str, Any]]:
    """Messages as the TanStack transport materializes them from session chunks."""
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        kind = chunk.get("type")
        if kind == "MESSAGES_SNAPSHOT" and isinstance(chunk.get("messages"), list):
            messages = [dict(m, parts=list(m.get("parts") or [])) for m in chunk["messages"] if isinstance(m, dict)]
        elif kind in ("TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT") and isinstance(chunk.get("messageId"), str):
            message = next((m for m in messages if m.get("id") == chunk["messageId"]), None)
            if message is None:
                role = chunk.get("role") if kind == "TEXT_MESSAGE_START" else "assistant"
                message = {"id": chunk["messageId"], "role": "assistant" if role == "tool" else role, "parts": []}
                messages.append(message)
            if kind == "TEXT_MESSAGE_CONTENT":
                delta = chunk.get("delta", chunk.get("content", ""))
                text = message_text(message) + (delta if isinstance(delta, str) else "")
                parts = message["parts"]
                index = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].get("type") == "text"), None)
                if index is None:
                    parts.append({"type": "text", "content": text})
                else:
                    parts[index] = {**parts[index], "content": text}
    return messages


def _stored(chunk: Any) -> Any:
    """``TEXT_MESSAGE_CONTENT`` keeps ``delta`` only: ``content`` (the text so far) would make the
    stream grow with the square of the answer's length."""
    if isinstance(chunk, dict) and chunk.get("type") == "TEXT_MESSAGE_CONTENT" and "content" in chunk:
        return {k: v for k, v in chunk.items() if k != "content"}
    return chunk


class TanStackChat(ChatApp):
    """Durable TanStack AI chat sessions over ``streams``; see the module's documentation."""

    kind = "tanstack"
    default_api = "/api/tanstack"

    def __init__(
        self,
        streams: DurableStreams,
        model: TanStackModel,
        *,
        path_prefix: str = "/sessions",
        mode: Literal["immediate", "await"] = "immediate",
        ttl: int | None = 30 * 24 * 3600,
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
        """The endpoints below ``api`` (default ``/api/tanstack``), for a Starlette or FastAPI
        app: ``app.router.routes.extend(chat.routes())``."""
        api = "/" + (api or self.default_api).strip("/")
        return [
            Route(api + "/{chat_id}", guarded(self.send), methods=["POST"]),
            Route(api + "/{chat_id}/stream", RawEndpoint(self._read), methods=["GET", "HEAD"]),
            Route(api + "/{chat_id}/stop", guarded(self.stop), methods=["POST"]),
            Route(api + "/{chat_id}/snapshot", guarded(self.snapshot_endpoint), methods=["GET"]),
        ]

    def session_path(self, chat_id: str) -> str:
        return f"{self.path_prefix}/{chat_id}"

    async def _ensure_session(self, chat_id: str) -> str:
        path = self.session_path(chat_id)
        await self.streams.create(path, content_type="application/json", ttl=self.ttl)
        return path

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        chat_id = chat_id_of(request.path_params["chat_id"])
        body = await json_object(request, self.max_body_size)
        messages = message_list(body.get("messages"))
        await check(self.authorize, request, "send", chat_id)
        generation = await self.start(chat_id, messages, body.get("data"), request)
        if self.mode == "await":
            await generation.wait()
            return no_store(Response(status_code=200))
        return no_store(Response(status_code=202))

    async def start(
        self, chat_id: str, messages: list[dict[str, Any]], data: Any = None, request: Request | None = None
    ) -> Generation:
        """Echo the new user messages and start the run (what ``POST`` does); the generation."""
        path = await self._ensure_session(chat_id)
        key = self._key(chat_id)
        # The new messages: the trailing user messages. Each is echoed with a producer of its own
        # (its id), so that a message sent again (a retried POST, a reload that regenerates the
        # answer) is in the session once.
        trailing: list[dict[str, Any]] = []
        for message in reversed(messages):
            if message.get("role", "user") != "user":
                break
            trailing.insert(0, message)
        turn = TanStackTurn(chat_id, messages, data, f"msg-{uuid.uuid4().hex}", f"run-{uuid.uuid4().hex}", request)
        # The runs' producer: the lease's fence is its epoch. The id changes when the lease's
        # record is new (never taken, or forgotten after a long idle time), whose fences start
        # again from 1, so that they never fall below an epoch the session already knows.
        previous = await self.streams.storage.get_lease(key)
        producer_id = Running.of(previous).details.get("producer") if previous is not None else None
        details = {
            "path": path,
            "message_id": turn.message_id,
            "run_id": turn.run_id,
            "producer": producer_id or f"{PRODUCER_ID}:{uuid.uuid4().hex}",
        }
        lease = await self.runtime.begin(key, details)
        if lease is None:
            raise ChatError(409, "this chat has an answer being written; stop it first")
        try:
            for message in trailing:
                message_id = message.get("id") if isinstance(message.get("id"), str) else ""
                producer = Producer(f"echo:{message_id or uuid.uuid4().hex}", 0, 0)
                items = [encode_message(c) for c in echo_chunks(message)]
                echo = AppendRequest("application/json", items, producer=producer)
                await append_with_retry(self.streams.storage, path, echo, self.retry_for)

            async def finalize(generation: Generation) -> None:
                await self.runtime.end(lease)

            return await self.streams.start_generation(
                path, self._chunks(turn), create=False, options=self._options(lease), finalize=finalize
            )
        except BaseException:
            await self.runtime.end(lease)
            raise

    def _options(self, lease: Lease) -> WriteOptions:
        details = Running.of(lease).details

        def error_record(exc: BaseException) -> dict[str, Any]:
            return self._run_error(details, "error", str(exc) or type(exc).__name__)

        return WriteOptions(
            content_type="application/json",
            close=False,
            producer_id=details["producer"],
            epoch=lease.fence,
            retry_for=self.retry_for,
            error_record=error_record,
        )

    async def _chunks(self, turn: TanStackTurn) -> AsyncIterator[Any]:
        async for chunk in self.model(turn):
            yield _stored(chunk)

    @staticmethod
    def _run_error(details: dict[str, Any], code: str, message: str) -> dict[str, Any]:
        return {
            "type": "RUN_ERROR",
            "threadId": details.get("path", "").rsplit("/", 1)[-1],
            "runId": details.get("run_id"),
            "message": message,
            "code": code,
            "error": {"message": message, "code": code},
            "timestamp": _now_ms(),
        }

    # -- stop and takeover -----------------------------------------------------------------------

    async def _end(self, lease: Lease, *, orphaned: bool) -> None:
        """``TEXT_MESSAGE_END`` and ``RUN_ERROR`` (code ``aborted`` for a stop, ``orphaned`` when
        its writer died) with the new fence: any later append of the old writer is refused."""
        code, message = ("orphaned", "the server writing this answer stopped") if orphaned else ("aborted", "stopped")
        running = Running.of(lease)
        end = {"type": "TEXT_MESSAGE_END", "messageId": running.details.get("message_id"), "timestamp": _now_ms()}
        items = [encode_message(end), encode_message(self._run_error(running.details, code, message))]
        producer = Producer(running.details.get("producer", PRODUCER_ID), lease.fence, 0)
        request = AppendRequest("application/json", items, producer=producer)
        try:
            await self.streams.storage.append(running.path, request)
        except (StreamClosed, StaleEpoch, StreamNotFound):
            pass  # closed or deleted meanwhile, or a later writer took over: nothing to end

    # -- reading ---------------------------------------------------------------------------------

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The session stream, served by the streams app itself (catch-up, long-poll, SSE, every
        header and error as the protocol says), as if the client had asked for its own URL."""
        request = Request(scope, receive)
        try:
            chat_id = chat_id_of(request.path_params["chat_id"])
            await check(self.authorize, request, "read", chat_id)
            path = await self._ensure_session(chat_id)
        except StorageUnavailable:
            await error_response(UNAVAILABLE)(scope, receive, send)
            return
        except ChatError as exc:
            await error_response(exc)(scope, receive, send)
            return
        inner = dict(scope, path=path, raw_path=quote(path).encode(), root_path="")
        await self.streams.app(inner, receive, send)

    async def snapshot(self, chat_id: str) -> dict[str, Any]:
        """The conversation so far and the offset to resume from: what a server-rendered page
        passes to the client (``initialOffset``)."""
        messages: list[dict[str, Any]] = []
        offset = "-1"
        try:
            async for chunk in self.streams.read(self.session_path(chat_id)):
                messages = apply_chunks(messages, chunk.messages)
                offset = chunk.offset
        except StreamNotFound:
            pass
        return {"messages": messages, "offset": offset}

    async def snapshot_endpoint(self, request: Request) -> Response:
        chat_id = chat_id_of(request.path_params["chat_id"])
        await check(self.authorize, request, "read", chat_id)
        return no_store(JSONResponse(await self.snapshot(chat_id)))
