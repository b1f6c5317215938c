"""The storage interface every backend implements, and the errors it may raise.

The HTTP layer talks only to :class:`Storage`; it never knows which backend runs. Positions are
plain integers (bytes, or messages for JSON streams) and are turned into opaque offsets by
:mod:`durable_streams_asgi.offsets` at the HTTP boundary.

Every method that takes a ``path`` raises :class:`StreamNotFound` when no live stream is there
(never created, deleted, or expired) and :class:`StreamGone` when the stream is soft-deleted
(deleted while forks still reference it). Backends that talk to a server raise
:class:`StorageUnavailable` when it cannot be reached; nothing has been written in that case.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .quick_init import quick_init

# --------------------------------------------------------------------------------------------
# Errors. Each names the protocol condition, not the HTTP status: the mapping to statuses lives
# in one place, durable_streams_asgi.protocol.


class StorageError(Exception):
    """Base class for every error a storage raises on purpose."""


class StreamNotFound(StorageError):
    """No stream exists at the path (or it expired)."""


class StreamGone(StorageError):
    """The stream was deleted but is kept for the forks that still read from it."""


class StreamExists(StorageError):
    """``create`` found a stream at the path whose configuration differs from the request."""


class StreamClosed(StorageError):
    """An append reached a closed stream. ``tail`` is the stream's final position."""

    def __init__(self, tail: int) -> None:
        super().__init__(tail)
        self.tail = tail


class ContentTypeMismatch(StorageError):
    """An append's content type differs from the stream's."""


class SequenceConflict(StorageError):
    """``Stream-Seq`` did not increase (byte-wise) over the last one accepted."""


class StaleEpoch(StorageError):
    """A producer wrote with an epoch older than the one the stream knows (zombie fencing)."""

    def __init__(self, current_epoch: int) -> None:
        super().__init__(current_epoch)
        self.current_epoch = current_epoch


class InvalidProducerSeq(StorageError):
    """A producer opened a new epoch with a sequence number other than 0."""


class ProducerSeqGap(StorageError):
    """A producer skipped sequence numbers; ``expected`` is the next one the stream accepts."""

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(expected, received)
        self.expected = expected
        self.received = received


class OffsetOutOfRange(StorageError):
    """A read or fork offset lies past the stream's tail."""


class ForkSourceNotFound(StorageError):
    """``create`` was asked to fork a stream that does not exist."""


class ForkSourceGone(StorageError):
    """``create`` was asked to fork a soft-deleted stream."""


class InvalidForkSubOffset(StorageError):
    """The fork sub-offset points past the next data boundary of the source."""


class StorageUnavailable(StorageError):
    """The backing service cannot be reached; the operation did not happen."""


class StorageFull(StorageError):
    """A create or append would pass the storage's configured limits (memory storage's bytes or
    streams); nothing was written."""


class RecordConflict(StorageError):
    """A record changed (or appeared, or went) since the version a conditional write expected;
    nothing was written. ``current`` is the record as it is now (None: absent)."""

    def __init__(self, key: str, current: Record | None) -> None:
        super().__init__(key)
        self.current = current


# --------------------------------------------------------------------------------------------
# Values passed in and out.


@quick_init
@dataclass(frozen=True, slots=True)
class StreamConfig:
    """What a PUT asks for. Two creates are the same request when their configs are equal."""

    #: None: the default (``application/octet-stream``), or for a fork the source's type.
    content_type: str | None
    #: Sliding time-to-live in seconds, reset by reads and writes.
    ttl_seconds: int | None = None
    #: Absolute expiry, Unix time in seconds.
    expires_at: float | None = None
    #: Create the stream already closed.
    closed: bool = False
    #: Fork source path, with the fork point (None: the source's tail) and sub-offset.
    fork_from: str | None = None
    fork_offset: int | None = None
    fork_sub_offset: int = 0


@quick_init
@dataclass(frozen=True, slots=True)
class Producer:
    """Idempotent producer headers of one request (PROTOCOL.md section 5.2.1)."""

    id: str
    epoch: int
    seq: int


@quick_init
@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One POST: zero or more items, optionally closing the stream.

    ``items`` are JSON messages (one serialized value each) for JSON streams and raw byte
    chunks otherwise; an empty sequence with ``close=True`` is a close-only request.
    """

    content_type: str | None
    items: Sequence[bytes]
    close: bool = False
    seq: str | None = None
    producer: Producer | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A snapshot of a stream's metadata."""

    content_type: str
    #: Position after the last byte or message.
    tail: int
    closed: bool
    ttl_seconds: int | None
    expires_at: float | None
    #: Distinguishes this stream from an earlier one at the same path (for ETags).
    stream_id: str
    #: Whether positions count JSON messages instead of bytes.
    is_json: bool = False


@quick_init
@dataclass(frozen=True, slots=True)
class CreateResult:
    #: False when an identical stream already existed (idempotent create).
    created: bool
    info: StreamInfo


@quick_init
@dataclass(frozen=True, slots=True)
class AppendResult:
    info: StreamInfo
    #: True when the producer tuple was already applied and nothing was written.
    duplicate: bool = False
    #: For producer requests: the producer's epoch and highest accepted sequence number.
    producer_epoch: int | None = None
    producer_seq: int | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class ReadResult:
    """Data from ``start`` up to ``next``; ``info`` is the stream as it was when read."""

    info: StreamInfo
    start: int
    next: int
    #: JSON messages, or byte chunks to concatenate.
    items: list[bytes] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return self.next >= self.info.tail

    @property
    def at_end(self) -> bool:
        """The reader has everything the closed stream will ever have (EOF)."""
        return self.info.closed and self.next >= self.info.tail


@quick_init
@dataclass(frozen=True, slots=True)
class Lease:
    """A named, expiring claim that one owner holds at a time (``acquire_lease``).

    ``fence`` grows by one with every acquisition of the key, so a value derived from it (a
    producer epoch, say) orders the holders: a later holder's writes fence off an earlier one's.
    ``expires_at_ms`` is on the storage's clock, the one every process shares.
    """

    key: str
    owner: str
    fence: int
    value: str
    expires_at_ms: int
    #: Taken and neither released nor past its deadline.
    held: bool


@quick_init
@dataclass(frozen=True, slots=True)
class Record:
    """A small document of shared control state (a subscription, a signing key) in a *space*.

    ``version`` changes with every write, and is never reused within the space (not even after a
    delete), so a conditional write that expects it cannot land on a newer record. ``now_ms`` is
    the storage's clock when the record was read: deadlines stored in records use that clock,
    the one every process shares.
    """

    key: str
    version: int
    value: bytes
    now_ms: int


#: An append observer: ``(path, start, end)``, the positions the append wrote between.
AppendObserver = Callable[[str, int, int], None]


class Watch:
    """A registration for changes to one stream past one position, from :meth:`Storage.watch`.

    ``future`` resolves (with None; it never fails) once the stream may have data past the
    position, was closed, or is gone: the holder then reads again. It is shared by every watcher of
    the stream, so never cancel it or set its result: await it through
    :func:`~durable_streams_asgi.storage.common.wait_resolved`, or add a done callback (and remove
    it when done). ``close()`` ends the watch (releasing, say, a pub/sub subscription); it is
    idempotent, and a holder must call it whether or not the future resolved.
    """

    __slots__ = ("_release", "future")

    def __init__(self, future: asyncio.Future[None], release: Callable[[], None] | None = None) -> None:
        self.future = future
        self._release = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


# --------------------------------------------------------------------------------------------
# The interface.


@runtime_checkable
class Storage(Protocol):
    """An async store of durable streams. All methods are safe under concurrent calls.

    Implementations must make each ``create`` and ``append`` atomic: validation (existence,
    closure, content type, Stream-Seq, producer epoch/seq) and the write happen together, so
    concurrent requests, from this process or another, never interleave, duplicate or lose data.
    """

    async def create(self, path: str, config: StreamConfig, items: Sequence[bytes] = ()) -> CreateResult:
        """Create a stream holding ``items``, or confirm an identical one exists.

        Raises :class:`StreamExists` (different config, or a soft-deleted stream at the path),
        :class:`StorageFull` (a backend with limits),
        and for forks :class:`ForkSourceNotFound`, :class:`ForkSourceGone`,
        :class:`OffsetOutOfRange`, :class:`InvalidForkSubOffset` and :class:`ContentTypeMismatch`.
        """
        ...

    async def append(self, path: str, request: AppendRequest) -> AppendResult:
        """Append (and/or close) atomically.

        Raises, in this order of precedence: :class:`StreamNotFound`, :class:`StreamGone`,
        :class:`StreamClosed`, :class:`ContentTypeMismatch`, :class:`StaleEpoch`,
        :class:`InvalidProducerSeq`, :class:`ProducerSeqGap`, :class:`SequenceConflict`, then
        :class:`StorageFull` (a backend with limits).
        A close-only request on a closed stream succeeds (idempotent close), and so does a
        retry of the producer request that closed it (``duplicate=True``).
        """
        ...

    async def read(self, path: str, start: int | None, max_bytes: int) -> ReadResult:
        """Read from ``start`` (None: the tail), at least one item if any, about ``max_bytes``.

        Refreshes a sliding TTL. Raises :class:`OffsetOutOfRange` when ``start`` is past the
        tail.
        """
        ...

    async def head(self, path: str) -> StreamInfo:
        """The stream's metadata. Does not refresh a sliding TTL."""
        ...

    async def delete(self, path: str) -> None:
        """Delete the stream (soft-delete while forks reference it)."""
        ...

    async def wait_for_data(self, path: str, position: int, timeout: float) -> bool:
        """Wait until the stream has data past ``position``, is closed, or is gone.

        Returns True when the caller should read again (new data, closure, deletion) and False
        when ``timeout`` seconds passed with none of these. Never misses a change that happens
        after the call starts.
        """
        ...

    async def watch(self, path: str, position: int) -> Watch:
        """Start watching the stream for data past ``position``, closure or deletion.

        The returned :class:`Watch`'s future is already resolved when there is something to read
        now (or the stream is gone); otherwise it resolves on the first change after the call
        started: like :meth:`wait_for_data`, but without a task waiting, so that a server holds
        thousands of idle live readers cheaply. Raises :class:`StorageUnavailable` when the
        backend cannot set up the watch. The caller must ``close()`` the watch.
        """
        ...

    def wake_all(self) -> None:
        """Wake every live waiter of this process (``wait_for_data`` returns True, watches
        resolve), so that each re-reads and sees why it should stop: a graceful drain."""
        ...

    async def ready(self) -> str | None:
        """None when this storage can serve requests and wake live readers now, else a short
        reason (a readiness probe's answer). Answers within a few seconds whatever the backend's
        state, and connects what is connected lazily (the live notifier)."""
        ...

    # -- leases: shared ownership of work (a running generation) across processes -------------
    #
    # A lease record outlives its release for about a week, so that its fence keeps growing
    # across holders; then it is forgotten.

    async def acquire_lease(
        self, key: str, owner: str, ttl_ms: int, value: str = "", *, force: bool = False
    ) -> Lease | None:
        """Take the lease ``key`` for ``owner`` for ``ttl_ms`` milliseconds, with ``value``.

        Succeeds when the lease is free (never taken, released, or past its deadline), or when
        ``force`` is set; returns the new :class:`Lease` (its fence one more than the last one).
        Returns None, changing nothing, when another owner holds it.
        """
        ...

    async def renew_lease(self, key: str, owner: str, fence: int, ttl_ms: int) -> bool:
        """Extend the lease to ``ttl_ms`` from now if ``owner`` still holds it at ``fence``.
        False when it was released, taken over, or had expired."""
        ...

    async def release_lease(self, key: str, owner: str, fence: int) -> bool:
        """Release the lease if ``owner`` holds it at ``fence`` (False otherwise; idempotent)."""
        ...

    async def get_lease(self, key: str) -> Lease | None:
        """The lease's record, held or not; None when it was never taken (or forgotten)."""
        ...

    async def expired_leases(self, prefix: str, limit: int = 100) -> list[Lease]:
        """Up to ``limit`` leases whose key starts with ``prefix`` that are taken, not released,
        and past their deadline: their holder stopped renewing them (it died). A caller takes one
        over with ``acquire_lease``, which exactly one concurrent caller wins."""
        ...

    # -- records: small shared documents (subscriptions, keys), changed by compare-and-set ---------

    async def get_record(self, space: str, key: str) -> Record | None:
        """The record ``key`` of ``space``, or None."""
        ...

    async def put_record(self, space: str, key: str, value: bytes, expected_version: int) -> Record:
        """Write the record if its version is ``expected_version`` (0: it must not exist), in one
        atomic step across processes; the record as written. Raises :class:`RecordConflict`
        otherwise, writing nothing."""
        ...

    async def delete_record(self, space: str, key: str, expected_version: int) -> None:
        """Delete the record if its version is ``expected_version``; raises :class:`RecordConflict`
        otherwise (an absent record conflicts with every version but 0, and deleting it with 0
        does nothing)."""
        ...

    async def list_records(self, space: str) -> tuple[int, list[Record]]:
        """The storage's clock (ms) and every record of ``space``, in no particular order. Meant
        for control state: a space holds hundreds or thousands of records, not millions."""
        ...

    async def scan_streams(self, prefix: str, cursor: str = "", count: int = 1000) -> tuple[list[str], str]:
        """Paths of streams whose path starts with ``prefix``, a page at a time: returns about
        ``count`` paths and the cursor of the next page ("" once done). A stream present for the
        whole scan is returned at least once; one created or deleted meanwhile may or may not be,
        and a deleted (or soft-deleted) stream may be: check with :meth:`head`."""
        ...

    def observe_appends(self, observer: AppendObserver) -> Callable[[], None]:
        """Call ``observer(path, start, end)`` after every create with data and every append with
        data that this process makes through this storage (not another process's), before the
        call returns; it returns the function that stops the observation. Observers must be
        quick and must not raise: they schedule work (a subscription's wake), they do not do it."""
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks. The storage is unusable afterwards."""
        ...
