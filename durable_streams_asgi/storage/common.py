"""Rules shared by every backend, so that they cannot drift apart."""

from __future__ import annotations

from .base import StreamConfig

DEFAULT_CONTENT_TYPE = "application/octet-stream"


def media_type(content_type: str | None) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``: parameters and case do not matter."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json_content_type(content_type: str | None) -> bool:
    return media_type(content_type) == "application/json"


def same_content_type(a: str | None, b: str | None) -> bool:
    return media_type(a) == media_type(b)


def config_matches(existing: StreamConfig, existing_closed: bool, requested: StreamConfig) -> bool:
    """Whether a PUT to an existing stream is an idempotent repeat (200) or a conflict (409)."""
    return (
        same_content_type(existing.content_type, requested.content_type)
        and existing.ttl_seconds == requested.ttl_seconds
        and existing.expires_at == requested.expires_at
        and existing_closed == requested.closed
        and existing.fork_from == requested.fork_from
        and (requested.fork_offset is None or existing.fork_offset == requested.fork_offset)
        and existing.fork_sub_offset == requested.fork_sub_offset
    )
