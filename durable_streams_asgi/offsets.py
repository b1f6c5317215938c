"""Offsets and cursors.

An offset names a position in a stream: the number of bytes (or, for JSON streams, messages) that
come before it. On the wire it is ``EEEEEEEEEEEEEEEE_PPPPPPPPPPPPPPPP``: two fixed-width decimal
fields, so lexicographic order equals numeric order, which the protocol requires (PROTOCOL.md
section 8). ``P`` is the position. ``E`` is reserved and always zero today: it leaves room for a
future storage layout (compaction epochs, say) without changing the width, and it makes our
offsets the same shape as the other implementations', which clients and tests sometimes hard-code
(``0000000000000000_0000000000000000`` for the start of a stream). Clients treat offsets as opaque.

Cursors (section 10.1) are 20-second interval numbers counted from 2024-10-09T00:00:00Z, pushed
strictly past any cursor the client echoes so that CDN cache keys never cycle.
"""

from __future__ import annotations

import random
import time

FIELD_WIDTH = 16
OFFSET_WIDTH = 2 * FIELD_WIDTH + 1
MAX_POSITION = 10**FIELD_WIDTH - 1
_EPOCH = "0" * FIELD_WIDTH

#: The ``-1`` sentinel: the beginning of the stream.
BEGINNING = "-1"
#: The ``now`` sentinel: the current tail of the stream.
NOW = "now"

CURSOR_EPOCH_SECONDS = 1728432000  # 2024-10-09T00:00:00Z
CURSOR_INTERVAL_SECONDS = 20
_MAX_CURSOR_JITTER_SECONDS = 3600


class InvalidOffset(ValueError):
    """The string is neither a sentinel nor an offset this server could have minted."""


_FORMAT = f"{_EPOCH}_%0{FIELD_WIDTH}d"  # built once: every response carries an offset


def encode_offset(position: int) -> str:
    return _FORMAT % position


def decode_offset(token: str) -> int:
    """Parse a minted offset. Sentinels are handled by the caller."""
    if (
        len(token) != OFFSET_WIDTH
        or token[FIELD_WIDTH] != "_"
        or not token.isascii()
        or token[:FIELD_WIDTH] != _EPOCH
        or not token[FIELD_WIDTH + 1 :].isdigit()
    ):
        raise InvalidOffset(token)
    return int(token[FIELD_WIDTH + 1 :])


def current_cursor_interval(now: float | None = None) -> int:
    now = time.time() if now is None else now
    return max(0, int((now - CURSOR_EPOCH_SECONDS) // CURSOR_INTERVAL_SECONDS))


def next_cursor(client_cursor: str | None, now: float | None = None) -> str:
    """The cursor for a live response, strictly after the one the client echoed."""
    interval = current_cursor_interval(now)
    if client_cursor is not None and client_cursor.isascii() and client_cursor.isdigit():
        echoed = int(client_cursor[:32])
        if echoed >= interval:
            # Same (or a future) interval: jump ahead by a random 1-3600 s so that clients
            # collapsed on one cache key spread out instead of looping on a cached response.
            jitter = random.randint(1, _MAX_CURSOR_JITTER_SECONDS)
            interval = echoed + max(1, -(-jitter // CURSOR_INTERVAL_SECONDS))
    return str(interval)
