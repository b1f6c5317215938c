"""A FastAPI chat whose generations are durable streams.

Run from this folder:  uvicorn main:app

- POST /api/chat starts a generation server-side and answers at once with the stream's URL; the
  generation goes on whatever the browser does (sleep, refresh, lose the network).
- GET /api/chat/{chat_id}/stream says whether that chat has a generation running (for resuming).
- /v1/stream/... is the Durable Streams protocol; the page reads its generation there over SSE.
- GET / is the chat page (plain HTML and JavaScript, no build step).

Storage is Redis when REDIS_URL is set, memory otherwise; DURABLE_STREAMS_LONG_POLL_TIMEOUT sets
the long-poll timeout. The model is a deterministic fake unless OPENAI_API_KEY or ANTHROPIC_API_KEY
is set (and that provider's SDK installed). HTTP writes to /v1/stream need
``Authorization: Bearer $DEMO_WRITE_TOKEN``; the app itself writes in-process.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from durable_streams_asgi import AccessDenied, DurableStreams, generation_response, reconnect_response
from durable_streams_asgi.storage.base import Storage
from durable_streams_asgi.storage.memory import MemoryStorage

HERE = Path(__file__).resolve().parent


def make_storage() -> Storage:
    url = os.environ.get("REDIS_URL")
    if not url:
        return MemoryStorage()
    from durable_streams_asgi.storage.redis import RedisStorage

    return RedisStorage.from_url(url, key_prefix=os.environ.get("DURABLE_STREAMS_KEY_PREFIX", "ds:"))


# -- access control: the framework's auth decides who may do what -----------------------------


async def authorize(request: Any, action: str, path: str) -> bool:
    """Anyone with a stream's URL may read it (the URL is the capability, as in a share link);
    writing over HTTP needs the write token. The generations below write in-process."""
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
)

# -- the model ----------------------------------------------------------------------------------


def fake_answer(prompt: str) -> list[str]:
    """The fake model's tokens for a prompt: deterministic, so tests know the whole answer."""
    count = int(os.environ.get("DEMO_TOKENS", "60"))
    words = f"You asked: {prompt.strip() or 'nothing'}. Here is a durable answer, token by token:".split()
    words += [f"t{i}" for i in range(count)]
    return [w + " " for w in words]


async def fake_model(prompt: str) -> AsyncIterator[str]:
    delay = float(os.environ.get("DEMO_TOKEN_DELAY", "0.05"))
    for token in fake_answer(prompt):
        await asyncio.sleep(delay)
        yield token


async def provider_model(prompt: str) -> AsyncIterator[str] | None:
    """A real model when a provider key and SDK are there (not exercised by the tests)."""
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from openai import AsyncOpenAI  # type: ignore[import-not-found]
        except ImportError:
            return None

        async def openai_tokens() -> AsyncIterator[str]:
            client = AsyncOpenAI()
            stream = await client.chat.completions.create(
                model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
                messages=[{"role": "user", "content": prompt}],
                stream=True,
            )
            async for event in stream:
                delta = event.choices[0].delta.content if event.choices else None
                if delta:
                    yield delta

        return openai_tokens()
    if os.environ.get("ANTHROPIC_API_KEY"):
        try:
            from anthropic import AsyncAnthropic  # type: ignore[import-not-found]
        except ImportError:
            return None

        async def anthropic_tokens() -> AsyncIterator[str]:
            client = AsyncAnthropic()
            async with client.messages.stream(
                model=os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-20250514"),
                max_tokens=1024,
                messages=[{"role": "user", "content": prompt}],
            ) as stream:
                async for text in stream.text_stream:
                    yield text

        return anthropic_tokens()
    return None


async def ui_message_chunks(tokens: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Tokens as AI SDK UI message chunks, the format ``createDurableChatTransport`` reads."""
    yield {"type": "start"}
    yield {"type": "text-start", "id": "text-1"}
    async for token in tokens:
        yield {"type": "text-delta", "id": "text-1", "delta": token}
    yield {"type": "text-end", "id": "text-1"}
    yield {"type": "finish"}


# -- the app -------------------------------------------------------------------------------------

app = FastAPI(lifespan=streams.lifespan)
app.mount("/v1/stream", streams.app)

# chat id -> path of its running generation. Per process: with several workers, keep this in
# your database (the AI SDK guide calls it activeStreamId).
active: dict[str, str] = {}


class ChatRequest(BaseModel):
    prompt: str
    chatId: str | None = None
    mode: str = "immediate"


@app.post("/api/chat")
async def start_chat(body: ChatRequest, request: Request) -> Response:
    chat_id = body.chatId or uuid.uuid4().hex[:12]
    path = f"/chats/{chat_id}/{uuid.uuid4().hex[:12]}"
    tokens = await provider_model(body.prompt) or fake_model(body.prompt)
    generation = await streams.start_generation(path, ui_message_chunks(tokens), ttl=24 * 3600)
    active[chat_id] = path
    generation.task.add_done_callback(lambda _: active.pop(chat_id, None) if active.get(chat_id) == path else None)
    url = streams.url_for(str(request.base_url), path)
    response = generation_response(generation, url, mode="await" if body.mode == "await" else "immediate")
    response.headers["X-Chat-Id"] = chat_id
    return response


@app.get("/api/chat/{chat_id}/stream")
async def reconnect(chat_id: str, request: Request) -> Response:
    path = active.get(chat_id)
    return reconnect_response(streams.url_for(str(request.base_url), path) if path else None)


@app.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse((HERE / "index.html").read_text())
