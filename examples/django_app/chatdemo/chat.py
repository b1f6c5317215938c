"""The project's durable chat: the AI SDK transport's server side (``AISDKChat``) over the
project's streams, with a fake model. ``asgi.py`` serves it at ``/api/chat``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings

from durable_streams_asgi.chat import AISDKChat, ChatTurn

from .streams import CHAT_STREAMS, streams


def reply_for(prompt: str) -> str:
    """What the fake model answers: deterministic, so tests know every token."""
    return f"You said: {' '.join(prompt.split())}. This answer was written token by token into a durable stream."


async def fake_model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
    """Stands in for an LLM: AI SDK UI message chunks, one word per text delta. (A real one would
    be the provider SDK's stream, as in the FastAPI example.)"""
    yield {"type": "start"}
    yield {"type": "text-start", "id": "t1"}
    for word in re.findall(r"\S+\s*", reply_for(turn.prompt)):
        await asyncio.sleep(settings.CHAT_TOKEN_DELAY)
        yield {"type": "text-delta", "id": "t1", "delta": word}
    yield {"type": "text-end", "id": "t1"}
    yield {"type": "finish"}


chat = AISDKChat(
    streams,
    fake_model,
    path_prefix=CHAT_STREAMS,
    ttl=settings.CHAT_STREAM_TTL,
    lease_ttl=settings.CHAT_LEASE_TTL,
)
