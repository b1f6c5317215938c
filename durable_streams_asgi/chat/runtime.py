"""Who runs which chat generation, shared by every process through the storage's leases.

A chat's running generation is a lease in the storage (key ``<kind>:<chat path>``), whose value
says which stream it writes and what to end it with. The process that started it holds the lease
and renews it every third of its time to live. Any process answers "is a generation running?" and
"stop it" from the lease, and every process looks, as often, for leases whose holder stopped
renewing them (a killed worker): exactly one takes such a lease over (``acquire_lease`` admits one)
and ends the orphaned generation, so its readers finish instead of waiting for a stream TTL.

The lease's fence is the producer epoch of the generation's appends. A stop or a takeover takes the
lease with a higher fence and writes with that epoch, so the old holder's next append fails
(``StaleEpoch``, or ``StreamClosed`` once the stream is closed) and it stops: there is never a second
writer after the one that ended the generation.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..aio import cancel_and_wait
from ..storage.base import Lease, StorageError, StorageUnavailable
from ..streams import DurableStreams

logger = logging.getLogger("durable_streams_asgi.chat")

#: The producer id of every chat generation's appends; the lease's fence is the epoch.
PRODUCER_ID = "chat"

Reaper = Callable[[Lease], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Running:
    """A chat's running generation, as its lease records it."""

    lease: Lease
    #: The stream it writes.
    path: str
    #: Whatever the chat kind recorded when it started (message ids, the turn's position).
    details: dict[str, Any]

    @classmethod
    def of(cls, lease: Lease) -> Running:
        value = json.loads(lease.value) if lease.value else {}
        return cls(lease, value.get("path", ""), value)


class ChatRuntime:
    """The leases of one :class:`DurableStreams`'s chat generations in this process: renewing the
    held ones, and taking over the orphaned ones of other processes. One per ``DurableStreams``
    (:meth:`of`); it runs as one of the streams' services."""

    def __init__(self, streams: DurableStreams, *, lease_ttl: float = 15.0) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        self.streams = streams
        self.storage = streams.storage
        self.lease_ttl = lease_ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._counter = itertools.count()
        self._held: dict[str, Lease] = {}
        self._reapers: dict[str, Reaper] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._passed = asyncio.Event()

    _instances: weakref.WeakKeyDictionary[DurableStreams, ChatRuntime] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, streams: DurableStreams, *, lease_ttl: float | None = None) -> ChatRuntime:
        """The runtime of ``streams`` (created on first use). Chat apps on the same streams share
        it; the first one to ask sets its ``lease_ttl``."""
        runtime = cls._instances.get(streams)
        if runtime is None:
            runtime = cls(streams, lease_ttl=15.0 if lease_ttl is None else lease_ttl)
            cls._instances[streams] = runtime
            streams.add_service(runtime)
        return runtime

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.lease_ttl * 1000))

    def on_orphan(self, prefix: str, reaper: Reaper) -> None:
        """Call ``reaper(lease)`` for orphaned leases under ``prefix``, once this process has taken
        them over (the lease passed is the new one: write with its fence)."""
        self._reapers[prefix] = reaper

    # -- the lease of one generation -------------------------------------------------------------

    def _holder(self) -> str:
        """A holder name per generation (not per process): two requests of one process for the
        same chat must not both get its lease."""
        return f"{self.owner}:{next(self._counter)}"

    async def begin(self, key: str, details: dict[str, Any]) -> Lease | None:
        """Take the lease of a new generation; None when one is running already."""
        self.start()
        lease = await self.storage.acquire_lease(key, self._holder(), self.ttl_ms, json.dumps(details))
        if lease is not None:
            self._held[key] = lease
        return lease

    async def take_over(self, running: Running) -> Lease:
        """Take the lease from whoever holds it (a stop): its writes are fenced off from now."""
        lease = await self.storage.acquire_lease(
            running.lease.key, self._holder(), self.ttl_ms, running.lease.value, force=True
        )
        assert lease is not None  # force always takes it
        return lease

    async def end(self, lease: Lease) -> None:
        """Release the lease (if still ours): the chat has no running generation any more."""
        if self._held.get(lease.key) == lease:
            del self._held[lease.key]
        try:
            await self.storage.release_lease(lease.key, lease.owner, lease.fence)
        except StorageError as exc:
            # It expires by itself; the keeper then finds the generation ended and lets it go.
            logger.warning("chat lease %s: release failed (%r); it expires in %.0f s", lease.key, exc, self.lease_ttl)

    async def running(self, key: str) -> Running | None:
        lease = await self.storage.get_lease(key)
        return Running.of(lease) if lease is not None and lease.held else None

    # -- the keeper ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.ensure_future(self._keep())

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        await cancel_and_wait(task)  # (the loop also stops on the closed flag)

    async def _keep(self) -> None:
        interval = self.lease_ttl / 3
        while not self._closed:
            try:
                await self._renew()
                await self._reap()
            except asyncio.CancelledError:
                raise
            except StorageUnavailable as exc:
                logger.warning("chat leases: storage unavailable (%s); trying again", exc)
            except Exception:
                logger.exception("chat leases: keeper pass failed")
            self._passed.set()
            self._passed = asyncio.Event()
            await asyncio.sleep(interval)

    async def next_pass(self) -> None:
        """Wait until the keeper has made one more whole pass (renewals, then takeovers)."""
        self.start()
        await self._passed.wait()

    async def _renew(self) -> None:
        for key, lease in list(self._held.items()):
            if not await self.storage.renew_lease(key, lease.owner, lease.fence, self.ttl_ms):
                # Stopped or taken over elsewhere: the generation finds out at its next append.
                if self._held.get(key) == lease:
                    del self._held[key]

    async def _reap(self) -> None:
        for prefix, reaper in list(self._reapers.items()):
            for orphan in await self.storage.expired_leases(prefix):
                if orphan.key in self._held:
                    continue  # ours, and renewal was late: not an orphan
                lease = await self.storage.acquire_lease(orphan.key, self._holder(), self.ttl_ms, orphan.value)
                if lease is None:
                    continue  # another process took it over first
                logger.warning("chat generation %s: its process stopped renewing it; ending it", orphan.key)
                try:
                    await reaper(lease)
                except Exception:
                    # Left held by us: it expires again and is retried on a later pass.
                    logger.exception("chat generation %s: ending the orphan failed", orphan.key)
                    continue
                await self.end(lease)
