"""The Redis key layout's encodings, data entries, and the decoding of script replies, shared by the
storage and its fork-reference management."""

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
