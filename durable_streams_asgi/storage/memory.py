"""In-memory storage: the embedded default for development and tests.

Everything lives in one process. Each operation runs without yielding to the event loop between
its validation and its write, which is what makes it atomic; there are no locks to take.
Live readers wait on one future per stream that every change resolves, so an append costs the
same however many readers wait, and nobody polls.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from bisect import bisect_right
from collections.abc import Sequence

from .base import (
    AppendRequest,
    AppendResult,
    ContentTypeMismatch,
    CreateResult,
    InvalidProducerSeq,
    OffsetOutOfRange,
    ProducerSeqGap,
    ReadResult,
    SequenceConflict,
    StaleEpoch,
    StreamClosed,
    StreamConfig,
    StreamExists,
    StreamInfo,
    StreamNotFound,
)
from .base import (
    StorageError as StorageError,  # re-exported for convenience
)
from .common import config_matches, is_json_content_type, same_content_type

# How often expired streams are swept out, at most (seconds). Expiry itself is exact: every
# access checks the stream's own deadline; the sweep only frees memory of streams nobody reads.
_SWEEP_INTERVAL = 1.0
# In-memory stores drop producer state idle for this long (PROTOCOL.md 5.2.1 recommends 7 days).
PRODUCER_STATE_TTL = 7 * 24 * 3600.0

_ids = itertools.count(1)


class _Producer:
    __slots__ = ("epoch", "seq", "touched")

    def __init__(self, epoch: int, seq: int, touched: float) -> None:
        self.epoch = epoch
        self.seq = seq
        self.touched = touched


class _Stream:
    __slots__ = (
        "changed",
        "chunks",
        "closed",
        "config",
        "deadline",
        "ends",
        "is_json",
        "last_seq",
        "producers",
        "stream_id",
    )

    def __init__(self, config: StreamConfig, now: float) -> None:
        self.config = config
        self.is_json = is_json_content_type(config.content_type)
        self.stream_id = f"m{next(_ids)}"
        # chunks[i] holds positions ends[i-1] .. ends[i]; for JSON streams one message each.
        self.chunks: list[bytes] = []
        self.ends: list[int] = []
        self.closed = False
        self.last_seq: str | None = None
        self.producers: dict[str, _Producer] = {}
        self.deadline: float | None = None
        self.changed: asyncio.Future[None] | None = None
        self.touch(now)

    @property
    def tail(self) -> int:
        return self.ends[-1] if self.ends else 0

    def touch(self, now: float) -> None:
        """Reset the sliding TTL (reads and writes do; HEAD does not)."""
        if self.config.ttl_seconds is not None:
            self.deadline = now + self.config.ttl_seconds
        elif self.config.expires_at is not None:
            self.deadline = self.config.expires_at

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def add(self, items: Sequence[bytes]) -> None:
        tail = self.tail
        for item in items:
            if not item:
                continue
            tail += 1 if self.is_json else len(item)
            self.chunks.append(item)
            self.ends.append(tail)

    def wake(self) -> None:
        if self.changed is not None:
            if not self.changed.done():
                self.changed.set_result(None)
            self.changed = None

    def info(self) -> StreamInfo:
        c = self.config
        return StreamInfo(
            content_type=c.content_type,
            tail=self.tail,
            closed=self.closed,
            ttl_seconds=c.ttl_seconds,
            expires_at=c.expires_at,
            stream_id=self.stream_id,
            is_json=self.is_json,
        )


class MemoryStorage:
    """Streams held in this process's memory; lost when it exits. One process only."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._next_sweep = 0.0

    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> float:
        return time.time()

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL
        for path in [p for p, s in self._streams.items() if s.expired(now)]:
            self._drop(path)

    def _drop(self, path: str) -> None:
        stream = self._streams.pop(path)
        stream.wake()

    def _get(self, path: str, now: float) -> _Stream:
        self._sweep(now)
        stream = self._streams.get(path)
        if stream is None:
            raise StreamNotFound(path)
        if stream.expired(now):
            self._drop(path)
            raise StreamNotFound(path)
        return stream

    # -- Storage -----------------------------------------------------------------------------

    async def create(self, path: str, config: StreamConfig, items: Sequence[bytes] = ()) -> CreateResult:
        now = self._now()
        self._sweep(now)
        existing = self._streams.get(path)
        if existing is not None and existing.expired(now):
            self._drop(path)
            existing = None
        if existing is not None:
            if not config_matches(existing.config, existing.closed, config):
                raise StreamExists(path)
            existing.touch(now)
            return CreateResult(created=False, info=existing.info())
        if config.fork_from is not None:
            raise NotImplementedError("forking is not supported by this storage yet")
        stream = _Stream(config, now)
        stream.add(items)
        stream.closed = config.closed
        self._streams[path] = stream
        return CreateResult(created=True, info=stream.info())

    async def append(self, path: str, request: AppendRequest) -> AppendResult:
        now = self._now()
        stream = self._get(path, now)
        producer = request.producer
        has_data = any(request.items)

        # Producer checks come first: a retry of the request that closed the stream must be
        # recognised as a duplicate (204), and a zombie must learn it is fenced (403) even when
        # the stream has closed since.
        if producer is not None:
            state = stream.producers.get(producer.id)
            if state is not None and now - state.touched > PRODUCER_STATE_TTL:
                state = None
            if state is None:
                if producer.seq != 0:
                    raise ProducerSeqGap(expected=0, received=producer.seq)
            elif producer.epoch < state.epoch:
                raise StaleEpoch(state.epoch)
            elif producer.epoch > state.epoch:
                if producer.seq != 0:
                    raise InvalidProducerSeq(producer.seq)
            elif producer.seq <= state.seq:
                state.touched = now
                return AppendResult(stream.info(), duplicate=True, producer_epoch=state.epoch, producer_seq=state.seq)
            elif producer.seq != state.seq + 1:
                raise ProducerSeqGap(expected=state.seq + 1, received=producer.seq)

        if stream.closed:
            if not has_data and request.close:
                # Closing a closed stream is idempotent.
                stream.touch(now)
                return AppendResult(stream.info(), duplicate=True)
            raise StreamClosed(stream.tail)

        if has_data and not same_content_type(request.content_type, stream.config.content_type):
            raise ContentTypeMismatch(request.content_type)

        if request.seq is not None:
            if stream.last_seq is not None and request.seq <= stream.last_seq:
                raise SequenceConflict(request.seq)
            stream.last_seq = request.seq

        # Validation passed: nothing below can fail, so the write is all-or-nothing.
        stream.add(request.items)
        if producer is not None:
            stream.producers[producer.id] = _Producer(producer.epoch, producer.seq, now)
        if request.close:
            stream.closed = True
        stream.touch(now)
        if has_data or request.close:
            stream.wake()
        return AppendResult(
            stream.info(),
            producer_epoch=producer.epoch if producer else None,
            producer_seq=producer.seq if producer else None,
        )

    async def read(self, path: str, start: int | None, max_bytes: int) -> ReadResult:
        now = self._now()
        stream = self._get(path, now)
        stream.touch(now)
        tail = stream.tail
        if start is None:
            start = tail
        if start > tail:
            raise OffsetOutOfRange(start)
        items: list[bytes] = []
        position = start
        if start < tail:
            ends, chunks = stream.ends, stream.chunks
            index = bisect_right(ends, start)
            size = 0
            while index < len(ends) and (not items or size < max_bytes):
                chunk = chunks[index]
                if not stream.is_json:
                    chunk_start = ends[index] - len(chunk)
                    lo = position - chunk_start
                    hi = min(len(chunk), lo + max(max_bytes - size, 1))
                    if lo or hi < len(chunk):
                        chunk = chunk[lo:hi]
                    position += len(chunk)
                else:
                    position = ends[index]
                items.append(chunk)
                size += len(chunk)
                index += 1
        return ReadResult(info=stream.info(), start=start, next=position, items=items)

    async def head(self, path: str) -> StreamInfo:
        return self._get(path, self._now()).info()

    async def delete(self, path: str) -> None:
        self._get(path, self._now())
        self._drop(path)

    async def wait_for_data(self, path: str, position: int, timeout: float) -> bool:
        try:
            stream = self._get(path, self._now())
        except StorageError:
            return True
        if stream.tail > position or stream.closed:
            return True
        if stream.changed is None:
            stream.changed = asyncio.get_running_loop().create_future()
        done, _ = await asyncio.wait((stream.changed,), timeout=timeout)
        return bool(done)

    async def aclose(self) -> None:
        for stream in self._streams.values():
            stream.wake()
        self._streams.clear()
