"""The reserved ``{root}/__ds/...`` API (PROTOCOL.md sections 6 and 7) over :class:`Subscriptions`.

The HTTP handler routes every path below ``/__ds`` here before any stream operation, so no
client can create or read a stream under it. Answers are JSON; refusals carry
``{"error": {"code", "message"}}``. Management requests (create, read, delete, membership,
claim) go through the host's ``authorize`` hook with the action ``subscribe``; callbacks, acks and
releases are authorized by the wake's own bearer token instead.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from .manager import Subscriptions
from .model import SubscriptionError, check_id, invalid, parse_config, relative_path

MAX_BODY = 1024 * 1024
Headers = list[tuple[bytes, bytes]]
_JSON = (b"content-type", b"application/json")
_METHODS = {
    (): {"PUT", "GET", "DELETE"},
    ("streams",): {"POST"},
    ("callback",): {"POST"},
    ("ack",): {"POST"},
    ("release",): {"POST"},
    ("claim",): {"POST"},
}


def _json(status: int, value: Any, headers: Headers | None = None) -> tuple[int, Headers, bytes]:
    return status, [_JSON, *(headers or [])], json.dumps(value, separators=(",", ":")).encode()


def _bearer(headers: dict[str, str]) -> str:
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SubscriptionError(401, "TOKEN_INVALID", "an Authorization: Bearer <token> header is required")
    return token.strip()


async def handle(
    subs: Subscriptions,
    method: str,
    tail: str,
    headers: dict[str, str],
    body: Callable[[int], Awaitable[bytes]],
    root_url: str,
    authorize: Callable[[str, str], Awaitable[None]],
) -> tuple[int, Headers, bytes]:
    """Answer one request for ``{root}/__ds{tail}`` (``tail`` as sent, still percent-encoded):
    its status, headers and body. Raises the storage's errors for the caller to map."""
    try:
        return await _route(subs, method, tail, headers, body, root_url, authorize)
    except SubscriptionError as exc:
        return _json(exc.status, exc.body())


async def _route(
    subs: Subscriptions,
    method: str,
    tail: str,
    headers: dict[str, str],
    body: Callable[[int], Awaitable[bytes]],
    root_url: str,
    authorize: Callable[[str, str], Awaitable[None]],
) -> tuple[int, Headers, bytes]:
    segments = tail.split("/")[1:] if tail.startswith("/") else []
    if segments == ["jwks.json"]:
        if method not in ("GET", "HEAD"):
            raise SubscriptionError(405, "METHOD_NOT_ALLOWED", "GET the JWK Set")
        status, _, raw = _json(200, await subs.keys.jwks())
        cache = (b"cache-control", b"public, max-age=300")
        return status, [(b"content-type", b"application/jwk-set+json"), cache], raw
    if len(segments) < 2 or segments[0] != "subscriptions" or not segments[1]:
        raise SubscriptionError(404, "NOT_FOUND", "no such control resource")
    sid = check_id(unquote(segments[1]))
    rest = tuple(segments[2:])
    if len(rest) >= 2 and rest[0] == "streams":
        allowed = {"DELETE"}  # the path is one encoded segment, or (not encoded) several
    else:
        allowed = _METHODS.get(rest)
        if allowed is None:
            raise SubscriptionError(404, "NOT_FOUND", "no such control resource")
    if method not in allowed:
        raise SubscriptionError(405, "METHOD_NOT_ALLOWED", f"use {' or '.join(sorted(allowed))}")
    resource = f"/__ds/subscriptions/{sid}"

    async def read_json() -> Any:
        raw = await body(MAX_BODY)
        try:
            return json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
            raise invalid("the body is not JSON") from None

    if rest in (("callback",), ("ack",), ("release",)):
        token = _bearer(headers)
        answer = await subs.finish(sid, token, await read_json(), rest[0])
        return (204, [], b"") if answer is None else _json(200, answer)

    await authorize("subscribe", resource)
    if rest == ():
        if method == "PUT":
            config = parse_config(await read_json())
            created, state = await subs.put(sid, config, root_url)
            return _json(201 if created else 200, await subs.view(state, root_url))
        if method == "GET":
            return _json(200, await subs.view(await subs.get(sid), root_url))
        await subs.delete(sid)
        return 204, [], b""
    if rest == ("streams",):
        data = await read_json()
        paths = data.get("streams") if isinstance(data, dict) else None
        if not isinstance(paths, list) or not paths or len(paths) > 1000:
            raise invalid("give streams: a list of 1 to 1000 stream paths")
        await subs.add_streams(sid, sorted({relative_path(p, "streams[]") for p in paths}))
        return 204, [], b""
    if rest[0] == "streams":
        await subs.remove_stream(sid, relative_path(unquote("/".join(rest[1:])), "the stream path"))
        return 204, [], b""
    data = await read_json()  # claim
    worker = data.get("worker") if isinstance(data, dict) else None
    if not isinstance(worker, str) or not 0 < len(worker) <= 200:
        raise invalid("worker must be a name of 1 to 200 characters")
    return _json(200, await subs.claim(sid, worker))
