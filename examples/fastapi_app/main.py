"""A FastAPI chat whose answers are durable streams, on any number of workers.

Run from this folder (after building the page once: ``npm ci && npm run build`` in
``../chat_page``):

    uvicorn main:app                                   # memory storage, one process
    REDIS_URL=redis://localhost:6379/0 uvicorn main:app --workers 4

- ``/``: the chat page (React, the AI SDK's ``useChat`` with ``createDurableChatTransport`` of
  ``@durable-streams/aisdk-transport``, bundled from npm by ``../chat_page/build.mjs``).
- ``/api/chat``: the AI SDK chat (``AISDKChat``): send, reconnect, stop, the conversation.
- ``/api/tanstack``: the same model as a TanStack AI chat session (``TanStackChat``), for
  ``durableStreamConnection`` of ``@durable-streams/tanstack-ai-transport``.
- ``/v1/stream/...``: the Durable Streams protocol the answers are read from.

Storage is Redis when ``REDIS_URL`` is set, memory otherwise. The model is OpenAI's or Anthropic's
when ``OPENAI_API_KEY`` or ``ANTHROPIC_API_KEY`` is set (and that SDK installed), and a
deterministic fake otherwise. HTTP writes to ``/v1/stream`` need ``Authorization: Bearer
$DEMO_WRITE_TOKEN``; the chats write in-process.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from durable_streams_asgi import AccessDenied, DurableStreams
from durable_streams_asgi.chat import (
    AISDKChat,
    ChatTurn,
    TanStackChat,
    TanStackTurn,
    tanstack_chunks,
    ui_message_chunks,
)
from durable_streams_asgi.storage.base import Storage
from durable_streams_asgi.storage.memory import MemoryStorage

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "chat_page"  # the page both examples serve, and its built bundle


def make_storage() -> Storage:
    url = os.environ.get("REDIS_URL")
    if not url:
        return MemoryStorage()
    from durable_streams_asgi.storage.redis import RedisStorage

    return RedisStorage.from_url(url, key_prefix=os.environ.get("DURABLE_STREAMS_KEY_PREFIX", "ds:"))


async def authorize(request: Any, action: str, path: str) -> bool:
    """Anyone with a stream's URL may read it (the URL is the capability, as in a share link);
    writing over HTTP needs the write token. The chats below write in-process."""
    if action == "read" or os.environ.get("DEMO_OPEN_WRITES") == "1":  # development only
        return True
    token = os.environ.get("DEMO_WRITE_TOKEN")
    given = request.headers.get("authorization", "")
    if not given:
        raise AccessDenied(401, "authentication required", {"WWW-Authenticate": "Bearer"})
    return bool(token) and hmac.compare_digest(given, f"Bearer {token}")


streams = DurableStreams(
    make_storage(),
    authorize=authorize,
    long_poll_timeout=float(os.environ.get("DURABLE_STREAMS_LONG_POLL_TIMEOUT", "30")),
    # Subscription webhooks to this machine over http: development and tests only.
    allow_loopback_webhooks=os.environ.get("DURABLE_STREAMS_ALLOW_LOOPBACK_WEBHOOKS") == "1",
)

# -- the model: text tokens for the conversation ------------------------------------------------


def fake_answer(prompt: str) -> list[str]:
    """The fake model's tokens for a prompt: deterministic, so tests know the whole answer."""
    count = int(os.environ.get("DEMO_TOKENS", "60"))
    words = f"You asked: {prompt.strip() or 'nothing'}. Here is a durable answer, token by token:".split()
    words += [f"t{i}" for i in range(count)]
    return [w + " " for w in words]


async def fake_tokens(prompt: str) -> AsyncIterator[str]:
    delay = float(os.environ.get("DEMO_TOKEN_DELAY", "0.05"))
    for token in fake_answer(prompt):
        await asyncio.sleep(delay)
        yield token


async def openai_tokens(conversation: list[dict[str, str]]) -> AsyncIterator[str]:
    from openai import AsyncOpenAI  # type: ignore[import-not-found]

    stream = await AsyncOpenAI().chat.completions.create(
        model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"), messages=conversation, stream=True
    )
    async for event in stream:
        delta = event.choices[0].delta.content if event.choices else None
        if delta:
            yield delta


async def anthropic_tokens(conversation: list[dict[str, str]]) -> AsyncIterator[str]:
    from anthropic import AsyncAnthropic  # type: ignore[import-not-found]

    async with AsyncAnthropic().messages.stream(
        model=os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-20250514"),
        max_tokens=1024,
        messages=[m for m in conversation if m["role"] in ("user", "assistant")],
    ) as stream:
        async for text in stream.text_stream:
            yield text


def tokens_for(conversation: list[dict[str, str]]) -> AsyncIterator[str]:
    """A provider's model when its key is set, the fake one otherwise."""
    if os.environ.get("OPENAI_API_KEY"):
        return openai_tokens(conversation)
    if os.environ.get("ANTHROPIC_API_KEY"):
        return anthropic_tokens(conversation)
    prompt = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
    return fake_tokens(prompt)


def text_of(message: dict[str, Any]) -> str:
    """A message's text, from AI SDK (``text``) or TanStack (``content``) text parts."""
    parts = message.get("parts") or []
    return "".join(p.get("text") or p.get("content") or "" for p in parts if p.get("type") == "text")


def conversation_of(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m.get("role", "user"), "content": text_of(m)} for m in messages]


async def aisdk_model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
    async for chunk in ui_message_chunks(tokens_for(conversation_of(turn.messages))):
        yield chunk


async def tanstack_model(turn: TanStackTurn) -> AsyncIterator[dict[str, Any]]:
    async for chunk in tanstack_chunks(tokens_for(conversation_of(turn.messages)), turn):
        yield chunk


lease_ttl = float(os.environ.get("CHAT_LEASE_TTL", "15"))
chat = AISDKChat(streams, aisdk_model, lease_ttl=lease_ttl)
tanstack = TanStackChat(streams, tanstack_model, lease_ttl=lease_ttl)

# -- the app -------------------------------------------------------------------------------------

app = FastAPI(lifespan=streams.lifespan)
app.mount("/v1/stream", streams.app)
app.router.routes.extend(chat.routes("/api/chat"))
app.router.routes.extend(tanstack.routes("/api/tanstack"))
app.mount("/static", StaticFiles(directory=PAGE / "dist", check_dir=False), name="static")


@app.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    return "ok"


@app.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse((PAGE / "index.html").read_text(), headers={"Cache-Control": "no-store"})
