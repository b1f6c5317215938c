"""The Redis key layout's encodings and the decoding of script replies, shared by the storage and
its fork-reference management."""

from __future__ import annotations

from collections.abc import Sequence

from .base import StreamInfo


def _escape(path: str) -> str:
    return path.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info(fields: Sequence[bytes]) -> StreamInfo:
    tail, closed, ct, ttl, exp, sid, is_json = fields[:7]
    return StreamInfo(
        content_type=_text(ct),
        tail=int(tail),
        closed=closed == b"1",
        ttl_seconds=int(ttl) if ttl else None,
        expires_at=int(exp) / 1000 if exp else None,
        stream_id=_text(sid),
        is_json=is_json == b"1",
    )


def _fork_origin(fields: Sequence[bytes]) -> tuple[str | None, int]:
    """(source path, fork point) from the info fields; (None, 0) for a stream that is no fork."""
    src, base = fields[7], fields[8]
    return (_text(src) if src else None), int(base or 0)
