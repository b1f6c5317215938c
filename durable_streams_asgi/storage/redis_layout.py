"""The Redis key layout's encodings, data entries, the creating request's record, and the decoding
of script replies, shared by the storage and its fork-reference management."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .base import CreateResult, StreamConfig, StreamExists, StreamInfo
from .common import config_matches


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


def _entries(items: Sequence[bytes], is_json: bool, size: int) -> list[bytes]:
    """Items as stored entries: JSON messages as they are, bytes in chunks of at most ``size``."""
    if is_json:
        return [item for item in items if item]
    out: list[bytes] = []
    for item in items:
        if len(item) <= size:
            if item:
                out.append(item)
        else:
            view = memoryview(item)
            out.extend(bytes(view[i : i + size]) for i in range(0, len(item), size))
    return out


def _take(
    entry_id: bytes, data: bytes, position: int, limit: int, is_json: bool, budget: int, out: list[bytes], size: int
) -> tuple[int, int]:
    """Add the part of one data entry from ``position`` to ``limit`` (and within budget) to ``out``."""
    end = int(entry_id.split(b"-", 1)[0])
    if end <= position or position >= limit:
        return position, size
    if is_json:
        out.append(data)
        return end, size + len(data)
    entry_start = end - len(data)
    lo = position - entry_start
    hi = min(len(data), limit - entry_start, lo + max(budget - size, 1))
    piece = data if lo == 0 and hi == len(data) else data[lo:hi]
    out.append(piece)
    return position + len(piece), size + len(piece)


def create_record(config: StreamConfig, fork_offset: int | None) -> str:
    """The creating request, stored with the stream (``rq``), so that a repeated create can be
    told identical (200) from conflicting (409)."""
    return json.dumps(
        {
            "ct": config.content_type,
            "ttl": config.ttl_seconds,
            "exp": config.expires_at,
            "src": config.fork_from,
            "off": fork_offset,
            "sub": config.fork_sub_offset,
        },
        separators=(",", ":"),
    )


def existing_stream(result: list[Any], config: StreamConfig) -> CreateResult:
    """A create script's reply for a stream that was there already: the same one, or a conflict."""
    status, record = result[0], json.loads(result[1] or b"{}")
    if status != b"ok":
        raise StreamExists("soft-deleted stream at this path")
    info = _info(result[2:])
    requested = StreamConfig(
        content_type=record.get("ct"),
        ttl_seconds=record.get("ttl"),
        expires_at=record.get("exp"),
        fork_from=record.get("src"),
        fork_sub_offset=record.get("sub", 0),
    )
    resolved = replace(requested, content_type=info.content_type, fork_offset=record.get("off"))
    if not config_matches(requested, resolved, info.closed, config):
        raise StreamExists("stream exists with a different configuration")
    return CreateResult(created=False, info=info)
