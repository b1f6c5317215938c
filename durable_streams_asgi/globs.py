"""Stream path patterns: ``*`` within one segment, ``**`` for any number of whole segments.

Used by the JWT permissions of :mod:`durable_streams_asgi.auth` and by subscriptions' ``pattern``.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["PathGlob", "glob_match", "glob_regex"]

_ANY_SEGMENTS = "(?:/[^/]*)*"


def glob_regex(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ValueError(f"a path pattern must start with '/': {pattern!r}")
    parts: list[str] = []
    for segment in pattern[1:].split("/"):
        if segment == "**":
            # "/**/**" means "/**"; repeating the group would only make failed matches backtrack.
            if not parts or parts[-1] != _ANY_SEGMENTS:
                parts.append(_ANY_SEGMENTS)
        elif "**" in segment:
            raise ValueError(f"'**' must be a whole segment: {pattern!r}")
        elif not segment:
            raise ValueError(f"a path pattern has no empty segments: {pattern!r}")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return "".join(parts)


class PathGlob:
    """A stream path pattern: ``*`` matches within one segment (never ``/``), a ``**`` segment any
    number of whole segments, zero included (``/chats/**`` matches ``/chats`` and ``/chats/1/x``).
    Every other character matches itself. A pattern starts with ``/``; ValueError otherwise."""

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._regex = re.compile(glob_regex(pattern))

    def match(self, path: str) -> bool:
        return self._regex.fullmatch(path) is not None


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> PathGlob:
    return PathGlob(pattern)


def glob_match(pattern: str, path: str) -> bool:
    """Whether ``path`` (``/chats/42/history``) matches ``pattern`` (see :class:`PathGlob`)."""
    return _compiled(pattern).match(path)
