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
import uuid
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import replace

from .. import metrics
from .base import (
    AppendRequest,
    AppendResult,
    ContentTypeMismatch,
    CreateResult,
    ForkSourceGone,
    ForkSourceNotFound,
    InvalidProducerSeq,
    OffsetOutOfRange,
    ProducerSeqGap,
    ReadResult,
    SequenceConflict,
    StaleEpoch,
    StorageFull,
    StreamClosed,
    StreamConfig,
    StreamExists,
    StreamGone,
    StreamInfo,
    StreamNotFound,
    Watch,
)
from .base import (
    StorageError as StorageError,  # re-exported for convenience
)
from .common import (
    DEFAULT_CONTENT_TYPE,
    config_matches,
    is_json_content_type,
    resolve_fork,
    resolved_watch,
    same_content_type,
    wait_resolved,
)
from .memory_leases import MemoryLeases
from .memory_records import MemoryRecords

# How often expired streams are swept out, at most (seconds). Expiry itself is exact: every
# access checks the stream's own deadline; the sweep only frees memory of streams nobody reads.
_SWEEP_INTERVAL = 1.0
# In-memory stores drop producer state idle for this long (PROTOCOL.md 5.2.1 recommends 7 days).
PRODUCER_STATE_TTL = 7 * 24 * 3600.0

# Stream ids tell streams at one path apart in ETags (served with Cache-Control: public): unique
# across restarts too, or a new stream could repeat an old one's ETag for other content.
_PROCESS = uuid.uuid4().hex[:12]
_ids = itertools.count(1)


class _Producer:
    __slots__ = ("epoch", "seq", "touched")

    def __init__(self, epoch: int, seq: int, touched: float) -> None:
        self.epoch = epoch
        self.seq = seq
        self.touched = touched


class _Stream:
    __slots__ = (
        "_info",
        "base",
        "changed",
        "chunks",
        "closed",
        "config",
        "deadline",
        "deleted",
        "ends",
        "is_json",
        "last_seq",
        "path",
        "producers",
        "refs",
        "requested",
        "source",
        "stream_id",
    )

    def __init__(
        self,
        path: str,
        config: StreamConfig,
        requested: StreamConfig,
        now: float,
        source: _Stream | None = None,
        base: int = 0,
    ) -> None:
        self.path = path
        #: The configuration in force (content type and expiry resolved, inherited for forks).
        self.config = config
        #: The configuration as the creating request gave it, for idempotent re-creates.
        self.requested = requested
        self.is_json = is_json_content_type(config.content_type)
        self.stream_id = f"m{_PROCESS}.{next(_ids)}"
        # A fork reads positions below ``base`` from ``source`` (shared, never copied).
        self.source = source
        self.base = base
        #: Forks that read from this stream; while any remain, deleting only soft-deletes.
        self.refs = 0
        self.deleted = False
        # chunks[i] holds positions ends[i-1] .. ends[i] (from ``base``); JSON: one message each.
        self.chunks: list[bytes] = []
        self.ends: list[int] = []
        self.closed = False
        self.last_seq: str | None = None
        self.producers: dict[str, _Producer] = {}
        self.deadline: float | None = None
        self.changed: asyncio.Future[None] | None = None
        self._info: StreamInfo | None = None
        self.touch(now)

    @property
    def tail(self) -> int:
        return self.ends[-1] if self.ends else self.base

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

    def collect(self, position: int, limit: int, max_bytes: int, out: list[bytes], size: int) -> tuple[int, int]:
        """Append data from ``position`` up to ``limit`` to ``out``, inherited data first.

        Stops once ``size`` reaches ``max_bytes`` (but always delivers something if it can).
        Returns the position reached and the new size.
        """
        if position < self.base:
            assert self.source is not None
            position, size = self.source.collect(position, min(limit, self.base), max_bytes, out, size)
            if position < min(limit, self.base):
                return position, size  # budget spent inside the inherited range
        ends, chunks = self.ends, self.chunks
        index = bisect_right(ends, position)
        while index < len(ends) and position < limit and (not out or size < max_bytes):
            chunk = chunks[index]
            if self.is_json:
                position = ends[index]
            else:
                chunk_start = ends[index] - len(chunk)
                lo = position - chunk_start
                hi = min(len(chunk), limit - chunk_start, lo + max(max_bytes - size, 1))
                if lo or hi < len(chunk):
                    chunk = chunk[lo:hi]
                position += len(chunk)
            out.append(chunk)
            size += len(chunk)
            index += 1
        return position, size

    def wake(self) -> None:
        if self.changed is not None:
            if not self.changed.done():
                self.changed.set_result(None)
            self.changed = None

    def info(self) -> StreamInfo:
        # Built once per change (tail, closure), not once per read: many readers read between.
        info = self._info
        if info is not None and info.tail == self.tail and info.closed == self.closed:
            return info
        c = self.config
        assert c.content_type is not None
        self._info = info = StreamInfo(
            content_type=c.content_type,
            tail=self.tail,
            closed=self.closed,
            ttl_seconds=c.ttl_seconds,
            expires_at=c.expires_at,
            stream_id=self.stream_id,
            is_json=self.is_json,
        )
        return info


class MemoryStorage(MemoryLeases, MemoryRecords):
    """Streams held in this process's memory; lost when it exits. One process only.

    ``max_bytes`` (default 1 GiB) and ``max_streams`` (default 100,000) bound what it holds, so a
    development server open to anyone cannot be filled until the process dies: a create or append
    past them raises :class:`StorageFull` (HTTP 507) and writes nothing. None: no limit.
    """

    def __init__(self, *, max_bytes: int | None = 1 << 30, max_streams: int | None = 100_000) -> None:
        super().__init__()
        self._streams: dict[str, _Stream] = {}
        self._next_sweep = 0.0
        self.max_bytes = max_bytes
        self.max_streams = max_streams
        #: Bytes of data held by every stream (inherited data is counted once, by its source).
        self.bytes = 0

    def _reserve(self, items: Sequence[bytes], new_stream: bool) -> int:
        """Check the limits for writing ``items``; their size, to add once written."""
        size = sum(len(item) for item in items)
        if new_stream and self.max_streams is not None and len(self._streams) >= self.max_streams:
            raise StorageFull(f"memory storage holds {self.max_streams} streams, its limit")
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            raise StorageFull(f"memory storage holds {self.bytes} bytes; {size} more would pass its limit")
        return size

    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> float:
        return time.time()

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_INTERVAL
        for stream in [s for s in self._streams.values() if not s.deleted and s.expired(now)]:
            self._delete(stream)

    def _delete(self, stream: _Stream) -> None:
        """Delete (expiry or DELETE): soft while forks read from it, else gone for good."""
        stream.wake()
        if stream.refs > 0:
            stream.deleted = True
            return
        # Release the chain: a soft-deleted source whose last fork this was goes too.
        current: _Stream | None = stream
        while current is not None:
            if self._streams.get(current.path) is current:
                del self._streams[current.path]
                self.bytes -= sum(len(chunk) for chunk in current.chunks)
            source = current.source
            current.source = None
            if source is None:
                break
            source.refs -= 1
            current = source if source.refs == 0 and source.deleted else None

    def _lookup(self, path: str, now: float) -> _Stream | None:
        """The stream at ``path`` (soft-deleted included), after applying expiry."""
        self._sweep(now)
        stream = self._streams.get(path)
        if stream is not None and not stream.deleted and stream.expired(now):
            self._delete(stream)
            stream = self._streams.get(path)
        return stream

    def _get(self, path: str, now: float) -> _Stream:
        stream = self._lookup(path, now)
        if stream is None:
            raise StreamNotFound(path)
        if stream.deleted:
            raise StreamGone(path)
        return stream

    # -- Storage -----------------------------------------------------------------------------

    async def create(self, path: str, config: StreamConfig, items: Sequence[bytes] = ()) -> CreateResult:
        now = self._now()
        existing = self._lookup(path, now)
        if existing is not None:
            if existing.deleted or not config_matches(existing.requested, existing.config, existing.closed, config):
                raise StreamExists(path)
            existing.touch(now)
            return CreateResult(created=False, info=existing.info())
        source: _Stream | None = None
        base = 0
        resolved = config
        if config.fork_from is not None:
            source = self._lookup(config.fork_from, now)
            if source is None:
                raise ForkSourceNotFound(config.fork_from)
            if source.deleted:
                raise ForkSourceGone(config.fork_from)
            base, resolved = resolve_fork(config, source.config, source.tail)
        elif config.content_type is None:
            resolved = replace(config, content_type=DEFAULT_CONTENT_TYPE)
        size = self._reserve(items, new_stream=True)
        stream = _Stream(path, resolved, config, now, source, base)
        stream.add(items)
        self.bytes += size
        stream.closed = config.closed
        if source is not None:
            source.refs += 1
        self._streams[path] = stream
        if items:
            if metrics.current.enabled:
                metrics.current.appended(len(items), size)
            if self._append_observers:
                self._observed(path, base, stream.tail)
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

        if request.seq is not None and stream.last_seq is not None and request.seq <= stream.last_seq:
            raise SequenceConflict(request.seq)
        size = self._reserve(request.items, new_stream=False)

        # Validation passed: nothing below can fail, so the write is all-or-nothing.
        if request.seq is not None:
            stream.last_seq = request.seq
        start = stream.tail
        stream.add(request.items)
        self.bytes += size
        if producer is not None:
            stream.producers[producer.id] = _Producer(producer.epoch, producer.seq, now)
        if request.close:
            stream.closed = True
        stream.touch(now)
        if has_data or request.close:
            stream.wake()
        if has_data:
            if metrics.current.enabled:
                metrics.current.appended(len(request.items), size)
            if self._append_observers:
                self._observed(path, start, stream.tail)
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
        position, _ = stream.collect(start, tail, max_bytes, items, 0)
        return ReadResult(info=stream.info(), start=start, next=position, items=items)

    async def head(self, path: str) -> StreamInfo:
        return self._get(path, self._now()).info()

    async def scan_streams(self, prefix: str, cursor: str = "", count: int = 1000) -> tuple[list[str], str]:
        # Paths in order, the cursor the last one returned: a page is the next ``count`` after it.
        now = self._now()
        paths = sorted(p for p, s in self._streams.items() if p.startswith(prefix) and p > cursor and not s.deleted)
        page = [p for p in paths[:count] if not self._streams[p].expired(now)]
        return page, (paths[count - 1] if len(paths) > count else "")

    async def delete(self, path: str) -> None:
        self._delete(self._get(path, self._now()))

    def _changed(self, path: str, position: int) -> asyncio.Future[None] | None:
        """The stream's shared future for its next change, or None when there is something to
        read now (data past ``position``, closure, or no stream)."""
        try:
            stream = self._get(path, self._now())
        except StorageError:
            return None
        if stream.tail > position or stream.closed:
            return None
        if stream.changed is None:
            stream.changed = asyncio.get_running_loop().create_future()
        return stream.changed

    async def wait_for_data(self, path: str, position: int, timeout: float) -> bool:
        # Not through watch(): every long-poll round trip comes here, and a Watch per wait is
        # work that hundreds of readers on one worker would feel.
        changed = self._changed(path, position)
        return True if changed is None else await wait_resolved(changed, timeout)

    async def watch(self, path: str, position: int) -> Watch:
        changed = self._changed(path, position)
        # Nothing to release: the future is the stream's.
        return resolved_watch() if changed is None else Watch(changed)

    def wake_all(self) -> None:
        for stream in self._streams.values():
            stream.wake()

    async def ready(self) -> str | None:
        return None  # in this process: it serves whenever the process does

    async def aclose(self) -> None:
        for stream in self._streams.values():
            stream.wake()
            stream.source = None
        self._streams.clear()
        self.bytes = 0
