"""Server-Sent Events framing for live reads (PROTOCOL.md section 5.8).

Every ``data`` event is followed by a ``control`` event that carries the next offset, so a
client that reconnects resumes exactly after the last data it saw.
"""

from __future__ import annotations

import base64
import json
import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Base64 text has no line breaks of its own; we wrap it to keep single lines reasonably short.
_BASE64_LINE = 76 * 1024


def uses_base64(content_type: str) -> bool:
    """Text and JSON travel as UTF-8; anything else is base64-encoded."""
    media = content_type.split(";", 1)[0].strip().lower()
    return not (media.startswith("text/") or media == "application/json")


def whole_characters(data: bytes) -> int:
    """How many leading bytes of UTF-8 ``data`` end on a character boundary: all of them, less a
    character that an append split and the next append completes (invalid bytes count as whole,
    and are shown as U+FFFD)."""
    end = len(data)
    lead = end - 1
    while lead >= 0 and end - lead <= 4 and data[lead] & 0xC0 == 0x80:
        lead -= 1  # continuation bytes: find the byte that starts their character
    if lead < 0 or end - lead > 4:
        return end
    first = data[lead]
    needed = 2 if first & 0xE0 == 0xC0 else 3 if first & 0xF0 == 0xE0 else 4 if first & 0xF8 == 0xF0 else 1
    return lead if end - lead < needed else end


def data_event(payload: bytes, *, base64_encode: bool) -> bytes:
    """One ``event: data`` block. ``payload`` is the raw bytes (or the JSON array text)."""
    if base64_encode:
        text = base64.b64encode(payload).decode("ascii")
        lines = [text[i : i + _BASE64_LINE] for i in range(0, len(text), _BASE64_LINE)] or [""]
    else:
        # SSE cannot carry a bare CR or LF inside a line: each line break starts a new
        # ``data:`` line, and the client joins them back with LF.
        lines = _LINE_BREAK.split(payload.decode("utf-8", errors="replace"))
    # Clients drop one space after "data:"; a line that starts with a space gets an extra one.
    body = "".join(f"data: {line}\n" if line.startswith(" ") else f"data:{line}\n" for line in lines)
    return f"event: data\n{body}\n".encode()


def control_event(
    next_offset: str,
    *,
    cursor: str | None,
    up_to_date: bool,
    closed: bool,
) -> bytes:
    """One ``event: control`` block."""
    control: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        # A closed stream at its end is up to date by definition; no cursor since clients
        # must not reconnect.
        control["streamClosed"] = True
        control["upToDate"] = True
    else:
        if cursor is not None:
            control["streamCursor"] = cursor
        if up_to_date:
            control["upToDate"] = True
    return f"event: control\ndata:{json.dumps(control, separators=(',', ':'))}\n\n".encode()


# A comment line: keeps idle connections (and the proxies between) from timing out.
KEEPALIVE = b": keep-alive\n\n"
