"""Subscriptions' data: the configuration a client sends (validated and normalized), the state
kept in the storage (one record per subscription), and the errors the API answers with.

Paths in configurations, responses and wake bodies are stream-root-relative (``events/abc``), as
PROTOCOL.md section 6 has them; the storage's paths start with ``/``. Offsets are kept as
positions and written as the protocol's offsets.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import offsets, protocol
from ..globs import PathGlob
from ..protocol import ProtocolError

SubscriptionType = Literal["webhook", "pull-wake"]

DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 600_000
MAX_STREAMS = 1000  # explicit streams in one request: a request must stay small
MAX_DESCRIPTION = 1000
MAX_PATTERN = 1024
RESERVED = "__ds"
_ID = re.compile(r"[A-Za-z0-9._~:@-]{1,200}")


class SubscriptionError(Exception):
    """An API refusal: ``status``, the protocol's error ``code`` and a short message (JSON body
    ``{"error": {"code", "message", ...extra}}``)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def invalid(message: str) -> SubscriptionError:
    return SubscriptionError(400, "INVALID_REQUEST", message)


def not_found() -> SubscriptionError:
    return SubscriptionError(404, "SUBSCRIPTION_NOT_FOUND", "subscription not found")


def fenced(message: str = "the wake is no longer current") -> SubscriptionError:
    return SubscriptionError(409, "FENCED", message)


def check_id(subscription_id: str) -> str:
    if not _ID.fullmatch(subscription_id):
        raise invalid("a subscription id is 1-200 characters of letters, digits and . _ ~ : @ -")
    return subscription_id


def relative_path(value: Any, what: str) -> str:
    """A stream-root-relative path from a request body (``events/abc``), checked like any
    stream path and outside the reserved ``__ds`` prefix."""
    if not isinstance(value, str) or not value.strip("/"):
        raise invalid(f"{what} must be a stream path")
    try:
        path = protocol.validate_path("/" + value.strip("/"))
    except ProtocolError as exc:
        raise invalid(f"{what}: {exc.message}") from None
    if is_reserved(path):
        raise invalid(f"{what}: paths under {RESERVED}/ are reserved")
    return path[1:]


def is_reserved(path: str) -> bool:
    """Whether a storage path (``/__ds/...``) is under the reserved control prefix."""
    return path == "/" + RESERVED or path.startswith("/" + RESERVED + "/")


@dataclass(frozen=True)
class Config:
    """What a PUT asks for, normalized: the idempotency hash is over exactly this."""

    type: SubscriptionType
    pattern: str | None
    streams: tuple[str, ...]
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    def canonical(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "pattern": self.pattern,
            "streams": list(self.streams),
            "webhook": {"url": self.webhook_url} if self.webhook_url is not None else None,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        }

    def digest(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def glob(self) -> PathGlob | None:
        return None if self.pattern is None else PathGlob("/" + self.pattern)


def parse_config(body: Any) -> Config:
    """Validate a PUT body (PROTOCOL.md 6.2). Unknown fields are ignored; wrong ones are 400."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    kind = body.get("type")
    if kind not in ("webhook", "pull-wake"):
        raise invalid("type must be 'webhook' or 'pull-wake'")
    pattern = body.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern.strip("/") or len(pattern) > MAX_PATTERN:
            raise invalid(f"pattern must be a glob of at most {MAX_PATTERN} characters")
        pattern = pattern.strip("/")
        try:
            PathGlob("/" + pattern)
        except ValueError as exc:
            raise invalid(f"pattern: {exc}") from None
        if pattern.split("/", 1)[0] == RESERVED:
            raise invalid(f"pattern: paths under {RESERVED}/ are reserved")
    raw_streams = body.get("streams", [])
    if raw_streams is None:
        raw_streams = []
    if not isinstance(raw_streams, list) or len(raw_streams) > MAX_STREAMS:
        raise invalid(f"streams must be a list of at most {MAX_STREAMS} stream paths")
    streams = tuple(sorted({relative_path(item, "streams[]") for item in raw_streams}))
    if pattern is None and not streams:
        raise invalid("give a pattern, streams, or both")
    webhook, wake_stream = body.get("webhook"), body.get("wake_stream")
    url: str | None = None
    if kind == "webhook":
        if not isinstance(webhook, dict) or not isinstance(webhook.get("url"), str):
            raise invalid("webhook subscriptions need webhook.url")
        if wake_stream is not None:
            raise invalid("wake_stream is for pull-wake subscriptions")
        url = webhook["url"]
    else:
        if wake_stream is None:
            raise invalid("pull-wake subscriptions need wake_stream")
        if webhook is not None:
            raise invalid("webhook is for webhook subscriptions")
        wake_stream = relative_path(wake_stream, "wake_stream")
        if wake_stream in streams:
            raise invalid("a subscription's wake stream cannot be one of its streams")
    ttl = body.get("lease_ttl_ms", DEFAULT_LEASE_TTL_MS)
    if ttl is None:
        ttl = DEFAULT_LEASE_TTL_MS
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not MIN_LEASE_TTL_MS <= ttl <= MAX_LEASE_TTL_MS:
        raise invalid(f"lease_ttl_ms must be a whole number from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}")
    description = body.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION):
        raise invalid(f"description must be a string of at most {MAX_DESCRIPTION} characters")
    return Config(kind, pattern, streams, url, wake_stream, ttl, description)


def config_from(data: dict[str, Any]) -> Config:
    webhook = data.get("webhook")
    return Config(
        data["type"],
        data.get("pattern"),
        tuple(data.get("streams", ())),
        webhook["url"] if webhook else None,
        data.get("wake_stream"),
        data["lease_ttl_ms"],
        data.get("description"),
    )


@dataclass
class Link:
    """One stream of a subscription: its cursor (the position acked, inclusive of what came
    before it) and why it is linked."""

    acked: int
    explicit: bool = False
    glob: bool = False


@dataclass
class Wake:
    """The wake in flight: its snapshot of tails (what ``done`` acks), who holds its lease and
    until when (storage clock, ms), and who is delivering or announcing it."""

    id: str
    snapshot: dict[str, int]
    holder: str | None = None
    lease_until: int | None = None
    sender: str | None = None  # the process sending the webhook or writing the wake event
    send_until: int = 0  # until when that process counts as alive for it (storage clock, ms)
    sent: bool = False  # delivered (a 2xx) or announced (the wake event written)


@dataclass
class State:
    """A subscription as stored: its configuration and everything that moves."""

    id: str
    config: Config
    created_at: str
    base_url: str  # the stream root's URL as the creating client addressed it (for callback URLs)
    links: dict[str, Link] = field(default_factory=dict)
    generation: int = 0
    wake: Wake | None = None
    retries: int = 0  # failed webhook attempts in a row
    next_attempt_at: int = 0  # storage clock, ms: no webhook attempt before this
    deleted: bool = False

    @property
    def status(self) -> str:
        return "failed" if self.retries else "active"

    def encode(self) -> bytes:
        data = {
            "id": self.id,
            "config": self.config.canonical(),
            "created_at": self.created_at,
            "base_url": self.base_url,
            "links": {p: [link.acked, int(link.explicit), int(link.glob)] for p, link in self.links.items()},
            "generation": self.generation,
            "wake": None if self.wake is None else vars(self.wake),
            "retries": self.retries,
            "next_attempt_at": self.next_attempt_at,
            "deleted": self.deleted,
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> State:
        data = json.loads(raw)
        wake = data["wake"]
        return cls(
            id=data["id"],
            config=config_from(data["config"]),
            created_at=data["created_at"],
            base_url=data["base_url"],
            links={p: Link(v[0], bool(v[1]), bool(v[2])) for p, v in data["links"].items()},
            generation=data["generation"],
            wake=None if wake is None else Wake(**wake),
            retries=data["retries"],
            next_attempt_at=data["next_attempt_at"],
            deleted=data["deleted"],
        )

    def link(self, path: str, acked: int, *, explicit: bool = False, glob: bool = False) -> None:
        link = self.links.get(path)
        if link is None:
            self.links[path] = Link(acked, explicit, glob)
        else:
            link.explicit |= explicit
            link.glob |= glob

    def stream_list(self) -> list[dict[str, Any]]:
        return [
            {"path": path, "link_type": "explicit" if link.explicit else "glob", "acked_offset": encode(link.acked)}
            for path, link in sorted(self.links.items())
        ]


def encode(position: int) -> str:
    return offsets.encode_offset(position)


def decode(offset: Any) -> int:
    if not isinstance(offset, str):
        raise invalid("an offset must be a string")
    try:
        return offsets.decode_offset(offset)
    except offsets.InvalidOffset:
        raise SubscriptionError(409, "INVALID_OFFSET", f"not an offset of this server: {offset[:40]!r}") from None


def earliest(hint_sets: list[dict[str, int]]) -> dict[str, int]:
    """Hints merged: each path's earliest position (the start of its first unlooked-at append)."""
    merged: dict[str, int] = {}
    for hints in hint_sets:
        for path, start in hints.items():
            merged[path] = min(start, merged.get(path, start))
    return merged


def link_hinted(state: State, hints: dict[str, int]) -> None:
    """Link the streams the pattern matches among ``hints`` (path: position before its append)."""
    glob = state.config.glob()
    for path, start in hints.items():
        own = path == state.config.wake_stream
        if path not in state.links and not own and glob is not None and glob.match("/" + path):
            state.link(path, start, glob=True)


def stream_infos(state: State, wake: Wake) -> list[dict[str, Any]]:
    """The streams of a wake: each link's cursor and its tail in the wake's snapshot."""
    infos = []
    for path, link in sorted(state.links.items()):
        tail = max(wake.snapshot.get(path, link.acked), link.acked)
        infos.append(
            {
                "path": path,
                "link_type": "explicit" if link.explicit else "glob",
                "acked_offset": encode(link.acked),
                "tail_offset": encode(tail),
                "has_pending": tail > link.acked,
            }
        )
    return infos
