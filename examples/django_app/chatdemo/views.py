"""The Django side: the chat page, its bundle, login and logout.

The chat endpoints themselves (``/api/chat``: send, reconnect, stop, the conversation) are
``AISDKChat``'s, served in front of Django by ``asgi.py``; the page is the one both examples share
(``examples/chat_page``: React with the AI SDK's ``useChat`` over
``@durable-streams/aisdk-transport``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .streams import SESSION_USER_KEY, session_user

PAGE = Path(__file__).resolve().parents[2] / "chat_page"
BUNDLE_FILES = {"chat.js": "text/javascript", "chat.js.map": "application/json"}


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
    return HttpResponse((PAGE / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})


@require_GET
async def bundle(request: HttpRequest, name: str) -> FileResponse:
    """The page's script, built by ``npm run build`` in examples/chat_page (404 until then)."""
    path = PAGE / "dist" / name
    if name not in BUNDLE_FILES or not path.is_file():
        raise Http404("not built: run npm ci && npm run build in examples/chat_page")
    return FileResponse(path.open("rb"), content_type=BUNDLE_FILES[name])


# The JSON endpoints below are csrf_exempt: they only accept application/json, which a
# cross-origin page can send only after a CORS preflight that this project never approves, so
# a forged cross-site request cannot reach them.


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
