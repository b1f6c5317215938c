"""The Django side: a demo page, login/logout, and a durable chat endpoint.

``POST /api/chat`` starts a generation (a fake model here) that writes its answer into a new
durable stream in the background, and answers at once with the stream's URL, as
``@durable-streams/aisdk-transport`` expects in ``immediate`` mode. The client reads the answer
from that URL (catch-up, long-poll or SSE) and can resume from any offset after a reload or a
dropped connection; ``GET /api/chat/<id>/stream`` tells a returning client whether an answer for
that chat is still being written.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import get_script_prefix
from django.utils.crypto import constant_time_compare
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from durable_streams_asgi import Generation

from .streams import CHAT_STREAMS, SESSION_USER_KEY, session_user, streams

INDEX_HTML = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")
CHAT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: Chat id -> the generation writing its current answer. Per process: with several server
#: processes, keep this in Redis (or ask the storage) so any process can answer reconnects.
_running: dict[str, Generation] = {}


def reply_for(prompt: str) -> str:
    """What the fake model answers: deterministic, so tests know every token."""
    return f"You said: {' '.join(prompt.split())}. This answer was written token by token into a durable stream."


async def fake_model(prompt: str) -> AsyncIterator[dict[str, Any]]:
    """Stands in for an LLM: AI SDK UI message chunks, one word per text delta."""
    yield {"type": "start"}
    yield {"type": "text-start", "id": "t1"}
    for word in re.findall(r"\S+\s*", reply_for(prompt)):
        await asyncio.sleep(settings.CHAT_TOKEN_DELAY)
        yield {"type": "text-delta", "id": "t1", "delta": word}
    yield {"type": "text-end", "id": "t1"}
    yield {"type": "finish"}


def stream_url(request: HttpRequest, path: str) -> str:
    # The script prefix is "/" unless the project is served below a root path.
    return streams.url_for(request.build_absolute_uri(get_script_prefix()), path)


def json_body(request: HttpRequest) -> dict[str, Any] | JsonResponse:
    if request.content_type != "application/json":
        return JsonResponse({"error": "send application/json"}, status=415)
    try:
        body = json.loads(request.body)
    except ValueError:
        return JsonResponse({"error": "the body is not valid JSON"}, status=400)
    if not isinstance(body, dict):
        return JsonResponse({"error": "send a JSON object"}, status=400)
    return body


async def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(INDEX_HTML)


# The JSON endpoints below are csrf_exempt: they only accept application/json, which a
# cross-origin page can send only after a CORS preflight that this project never approves, so
# a forged cross-site request cannot reach them (and the chat endpoint acts for nobody).


@csrf_exempt
@require_POST
async def login(request: HttpRequest) -> JsonResponse:
    body = json_body(request)
    if isinstance(body, JsonResponse):
        return body
    username, password = body.get("username"), body.get("password")
    expected = settings.DEMO_USERS.get(username) if isinstance(username, str) else None
    if expected is None or not isinstance(password, str) or not constant_time_compare(password, expected):
        return JsonResponse({"error": "wrong username or password"}, status=401)
    await request.session.acycle_key()  # a new session on login (no session fixation)
    await request.session.aset(SESSION_USER_KEY, username)
    return JsonResponse({"user": username})


@csrf_exempt
@require_POST
async def logout(request: HttpRequest) -> HttpResponse:
    await request.session.aflush()
    return HttpResponse(status=204)


@require_GET
async def me(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user": await session_user(request.session)})


@csrf_exempt
@require_POST
async def chat(request: HttpRequest) -> JsonResponse:
    """Start an answer: ``{"prompt": "...", "id": "<chat id>"}`` (``id`` optional) -> 201,
    ``Location`` and ``{"streamUrl"}``."""
    body = json_body(request)
    if isinstance(body, JsonResponse):
        return body
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return JsonResponse({"error": '"prompt" must be a non-empty string'}, status=400)
    chat_id = body.get("id", uuid.uuid4().hex)
    if not isinstance(chat_id, str) or not CHAT_ID.fullmatch(chat_id):
        return JsonResponse({"error": '"id" must be 1 to 64 letters, digits, "-" or "_"'}, status=400)
    path = f"{CHAT_STREAMS}/{chat_id}/{uuid.uuid4().hex}"
    generation = await streams.start_generation(path, fake_model(prompt), ttl=settings.CHAT_STREAM_TTL)
    _running[chat_id] = generation

    def forget(_: object) -> None:
        if _running.get(chat_id) is generation:
            del _running[chat_id]

    generation.task.add_done_callback(forget)
    url = stream_url(request, path)
    return JsonResponse({"streamUrl": url}, status=201, headers={"Location": url})


@require_GET
async def chat_stream(request: HttpRequest, chat_id: str) -> HttpResponse:
    """The reconnect endpoint: 200 with the running answer's URL, or 204 when there is none."""
    generation = _running.get(chat_id)
    if generation is None or generation.done:
        return HttpResponse(status=204)
    url = stream_url(request, generation.path)
    return JsonResponse({"streamUrl": url}, status=200, headers={"Location": url})
