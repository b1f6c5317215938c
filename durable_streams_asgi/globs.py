"""Stream path patterns: ``*`` within one segment, ``**`` for any number of whole segments.

Used by the JWT permissions of :mod:`durable_streams_asgi.auth` and by subscriptions' ``pattern``,
which clients choose: so matching takes time linear in the path and the pattern, whatever they
are. (A regular expression with a ``[^/]*`` per star backtracks: ``/e/*a*a*a*a*a*a*a*a*b``
against a path of forty ``a`` froze the event loop for 30 s.) Both levels match greedily: a
segment's pieces between stars are found leftmost in order with ``str.find``, and the blocks of
segments between ``**`` likewise, which is exact for patterns with no other wildcard.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["PathGlob", "glob_match"]

_ANY = "**"


def _segment_matches(pieces: tuple[str, ...], segment: str) -> bool:
    """Whether ``segment`` matches a segment pattern split at its stars into ``pieces``."""
    if len(pieces) == 1:
        return segment == pieces[0]
    first, last = pieces[0], pieces[-1]
    if len(segment) < len(first) + len(last) or not segment.startswith(first) or not segment.endswith(last):
        return False
    position, end = len(first), len(segment) - len(last)
    for piece in pieces[1:-1]:
        found = segment.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def _block_at(block: tuple[tuple[str, ...], ...], segments: list[str], start: int) -> bool:
    return all(_segment_matches(pieces, segments[start + i]) for i, pieces in enumerate(block))


class PathGlob:
    """A stream path pattern: ``*`` matches within one segment (never ``/``), a ``**`` segment any
    number of whole segments, zero included (``/chats/**`` matches ``/chats`` and ``/chats/1/x``).
    Every other character matches itself. A pattern starts with ``/``; ValueError otherwise."""

    __slots__ = ("_blocks", "pattern")

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise ValueError(f"a path pattern must start with '/': {pattern!r}")
        self.pattern = pattern
        # The segment patterns between "**" segments: blocks of consecutive segments.
        blocks: list[list[tuple[str, ...]]] = [[]]
        for segment in pattern[1:].split("/"):
            if segment == _ANY:
                if blocks[-1] or len(blocks) == 1:
                    blocks.append([])  # "/**/**" is "/**"
            elif "**" in segment:
                raise ValueError(f"'**' must be a whole segment: {pattern!r}")
            elif not segment:
                raise ValueError(f"a path pattern has no empty segments: {pattern!r}")
            else:
                blocks[-1].append(tuple(segment.split("*")))
        # blocks[0] is anchored at the start and, past a "**", blocks[-1] at the end.
        self._blocks = tuple(tuple(block) for block in blocks)

    def match(self, path: str) -> bool:
        segments = path[1:].split("/") if path.startswith("/") else None
        if segments is None:
            return False
        blocks = self._blocks
        if len(blocks) == 1:  # no "**": one segment pattern per segment
            return len(segments) == len(blocks[0]) and _block_at(blocks[0], segments, 0)
        head, *middle, tail = blocks
        if len(segments) < len(head) + len(tail) + sum(map(len, middle)):
            return False
        if not _block_at(head, segments, 0) or not _block_at(tail, segments, len(segments) - len(tail)):
            return False
        position, end = len(head), len(segments) - len(tail)
        for block in middle:  # leftmost, in order, between the anchored ends
            while position + len(block) <= end and not _block_at(block, segments, position):
                position += 1
            if position + len(block) > end:
                return False
            position += len(block)
        return True


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> PathGlob:
    return PathGlob(pattern)


def glob_match(pattern: str, path: str) -> bool:
    """Whether ``path`` (``/chats/42/history``) matches ``pattern`` (see :class:`PathGlob`)."""
    return _compiled(pattern).match(path)
