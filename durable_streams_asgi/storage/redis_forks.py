"""Fork references on Redis: forks span hash slots, so creating one takes two scripts.

A fork takes a reference on its source (a script on the source's slot), then is created (a script
on its own). The two cannot be one transaction on a cluster, so every fork is also entered in an
index: sorted sets by when to check on it, ``<prefix>{__ds:forks:<n>}``, 16 parts in as many
slots chosen by the fork's path, so that a cluster's masters share it. Every process sweeps the
index every few seconds and releases the references of forks that are gone: expired by Redis
(which drops keys silently), or never created because a process died between the two steps. A source is
cleaned up once its last reference goes, however that happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import (
    ContentTypeMismatch,
    CreateResult,
    ForkSourceGone,
    ForkSourceNotFound,
    InvalidForkSubOffset,
    OffsetOutOfRange,
    StorageError,
    StreamConfig,
    StreamExists,
)
from .common import media_type
from .redis_layout import _text, existing_stream

logger = logging.getLogger("durable_streams_asgi.redis")

# How long a fork reference may exist before its fork does (creation takes one round trip).
_FORK_GRACE_MS = 60_000


class ForkReferences:
    """The fork half of :class:`~durable_streams_asgi.storage.redis.RedisStorage`."""

    _prefix: str
    sweep_interval: float

    if TYPE_CHECKING:

        def _index(self, indexed: str) -> str: ...
        @property
        def _indexes(self) -> list[str]: ...
        async def _call(self, script: str, path: str, *args: Any) -> list[Any]: ...
        async def _command(self, *args: Any) -> Any: ...
        def _keys(self, path: str) -> list[str]: ...
        async def _time_ms(self) -> int: ...
        async def _create(
            self,
            path: str,
            config: StreamConfig,
            content_type: str,
            ttl: int | None,
            expires_at: float | None,
            items: Sequence[bytes],
            *,
            stream_id: str | None = None,
            base: int = 0,
            fork_offset: int | None = None,
        ) -> CreateResult: ...

    async def _create_fork(self, path: str, config: StreamConfig, items: Sequence[bytes]) -> CreateResult:
        """Take a reference on the source (its slot), then create the fork (its own slot).

        The two steps cannot be one transaction on a cluster, so the fork is entered in the fork
        index first, due for a check after a grace period: if this process dies between the steps,
        or the create's outcome is unknown, the sweeper finds the reference without a fork and
        releases it. A reference is released here only when the path provably holds another stream.
        """
        assert config.fork_from is not None
        source = config.fork_from
        # An existing stream at the path answers without touching the source.
        existing = await self._call("head", path)
        if existing[0] != b"missing":
            return existing_stream(existing, config)
        stream_id = uuid.uuid4().hex[:16]
        member = f"{path}\n{stream_id}"
        indexed = f"{member}\n{source}"
        now = await self._time_ms()
        await self._command("ZADD", self._index(indexed), now + _FORK_GRACE_MS, indexed)
        ref = await self._call(
            "fork_ref",
            source,
            member,
            "" if config.fork_offset is None else str(config.fork_offset),
            str(config.fork_sub_offset),
            "" if config.content_type is None else media_type(config.content_type),
        )
        status = ref[0]
        if status != b"ok":
            await self._unindex(indexed)
            if status == b"gone":
                raise ForkSourceGone(source)
            if status == b"range":
                raise OffsetOutOfRange(config.fork_offset or 0)
            if status == b"sub":
                raise InvalidForkSubOffset(config.fork_sub_offset)
            if status == b"ct":
                raise ContentTypeMismatch(config.content_type)
            raise ForkSourceNotFound(source)
        anchor, point = int(ref[1]), int(ref[2])
        content_type = _text(ref[3])
        ttl, expires_at = config.ttl_seconds, config.expires_at
        if ttl is None and expires_at is None:  # inherit the source's (PROTOCOL.md 4.2)
            ttl = int(ref[5]) if ref[5] else None
            expires_at = int(ref[6]) / 1000 if ref[6] else None
        try:
            result = await self._create(
                path, config, content_type, ttl, expires_at, items, stream_id=stream_id, base=point, fork_offset=anchor
            )
        except StreamExists:
            await self._release_quietly(source, member, indexed)  # another stream holds the path
            raise
        if not result.created:
            await self._release_quietly(source, member, indexed)  # an identical fork won the race
            return result
        # Check on the fork when it is due to expire (never, without an expiry).
        if ttl is None and expires_at is None:
            await self._unindex(indexed)
        else:
            due = now + ttl * 1000 if ttl is not None else round((expires_at or 0) * 1000)
            with contextlib.suppress(StorageError):
                await self._command("ZADD", self._index(indexed), due, indexed)
        return result

    async def _release(self, source: str, member: str) -> None:
        """Drop a fork's reference on ``source``, cascading up the chain as sources go."""
        while True:
            result = await self._call("release", source, member)
            if result[0] != b"deleted" or not result[1]:
                return
            member = f"{source}\n{_text(result[2])}"
            upstream = _text(result[1])
            await self._unindex(f"{member}\n{upstream}")
            source = upstream

    async def _release_quietly(self, source: str, member: str, indexed: str) -> None:
        try:
            await self._release(source, member)
            await self._unindex(indexed)
        except StorageError as exc:
            logger.warning("could not release fork reference %r on %r (%s); the sweeper will", member, source, exc)
            with contextlib.suppress(StorageError):
                await self._command("ZADD", self._index(indexed), 0, indexed)

    async def _unindex(self, indexed: str, index: str | None = None) -> None:
        """Drop ``indexed`` from the fork index (from ``index``, the part it was found in, if given)."""
        with contextlib.suppress(StorageError):
            await self._command("ZREM", index or self._index(indexed), indexed)

    async def sweep(self) -> int:
        """Release the references of forks that are gone (expired by Redis, or never created
        because a process died half-way). Returns how many it released. Runs every
        ``sweep_interval`` seconds in every process; concurrent sweeps are harmless."""
        now = await self._time_ms()
        released = 0
        for index in self._indexes:
            released += await self._sweep_part(index, now)
        return released

    async def _sweep_part(self, index: str, now: int) -> int:
        due = await self._command("ZRANGEBYSCORE", index, "-inf", now, "LIMIT", 0, 200)
        released = 0
        for raw in due:
            fork_path, fork_id, source = _text(raw).split("\n")
            current, deadline = await self._command("HMGET", self._keys(fork_path)[0], "id", "dl")
            if current is not None and _text(current) == fork_id:
                if not deadline:
                    await self._unindex(_text(raw), index)
                else:
                    # A sliding TTL moved on, or the fork is kept for forks of its own: later.
                    await self._command("ZADD", index, max(int(deadline), now + _FORK_GRACE_MS), raw)
                continue
            await self._release(source, f"{fork_path}\n{fork_id}")
            await self._unindex(_text(raw), index)
            released += 1
        return released

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except Exception as exc:
                logger.debug("fork sweep failed: %s", exc)
