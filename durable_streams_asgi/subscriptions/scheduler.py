"""What happens without an append to start it: every process keeps its index of subscriptions
fresh, and one process at a time (the holder of a storage lease) looks after every subscription:
it expires leases, retries webhooks when their backoff has passed, takes over the sending of wakes
whose sender died, and opens wakes for pending work that no append hook saw (a process that died
between an append and its wake, or one whose index was behind).

Each of these is a compare-and-set on the subscription's record, so a second scheduler (two
processes each believing they hold the lease for a moment) can only repeat a check, never send a
wake twice: the claim to send is part of the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from ..aio import cancel_and_wait
from ..storage.base import StorageError
from .manager import INDEX_KEY, INDEX_SPACE, SEND_CLAIM_MS, SPACE, State, Unchanged

if TYPE_CHECKING:
    from .manager import Subscriptions

logger = logging.getLogger("durable_streams_asgi.subscriptions")

LEASE_KEY = "__ds:subscriptions:scheduler"
LEASE_MS = 5000
TICK = 0.25  # seconds between the scheduler's looks (lease expiry is checked at this grain)
INDEX_POLL = 0.5  # seconds between a process's checks of the index's version
PENDING_CHECK = 2.0  # seconds between checks of one subscription's tails with no wake in flight
DISCOVERY = 30.0  # seconds between scans for matching streams that no process linked
IDLE_TICK = 10.0  # seconds between looks while no process knows of any subscription


class Scheduler:
    def __init__(self, subs: Subscriptions) -> None:
        self.subs = subs
        self._loops: list[asyncio.Task[None]] = []
        self._busy: set[str] = set()
        self._checked: dict[str, float] = {}
        self._discovered: dict[str, float] = {}
        self._fence = 0
        self.leading = False
        # Also checked by the loops: redis-py can turn a cancellation inside a command into a
        # connection error, which the loops take for an outage and go on.
        self.stopping = False

    def start(self) -> None:
        self._loops = [asyncio.ensure_future(self._index_loop()), asyncio.ensure_future(self._lead_loop())]

    async def aclose(self) -> None:
        self.stopping = True
        await cancel_and_wait(self._loops)
        if self.leading:
            with contextlib.suppress(StorageError):
                await self.subs.storage.release_lease(LEASE_KEY, self.subs.process, self._fence)

    async def _index_loop(self) -> None:
        while not self.stopping:
            try:
                record = await self.subs.storage.get_record(INDEX_SPACE, INDEX_KEY)
                if record is not None and record.version != self.subs.index_version:
                    self.subs.load_index(record.version, record.value)
            except StorageError as exc:
                logger.debug("subscriptions: index not read: %s", exc)
            except Exception:  # a bug or a record it cannot read must not end the loop unseen
                logger.exception("subscriptions: index not read")
            await asyncio.sleep(INDEX_POLL)

    async def _lead_loop(self) -> None:
        storage, me = self.subs.storage, self.subs.process
        idle_since = time.monotonic()
        while not self.stopping:
            # With no subscription anywhere there is nothing to look after: look only now and
            # then (IDLE_TICK), for a subscription whose creator died before indexing it.
            active = bool(self.subs.index) or time.monotonic() - idle_since >= IDLE_TICK
            if active:
                idle_since = time.monotonic()
            try:
                if active and self.leading:
                    self.leading = await storage.renew_lease(LEASE_KEY, me, self._fence, LEASE_MS)
                if active and not self.leading:
                    lease = await storage.acquire_lease(LEASE_KEY, me, LEASE_MS)
                    self.leading = lease is not None
                    self._fence = lease.fence if lease is not None else 0
                if active and self.leading:
                    await self.tick()
            except StorageError as exc:
                logger.debug("subscriptions: scheduler tick skipped: %s", exc)
            except Exception:
                logger.exception("subscriptions: scheduler tick failed")
            # The others try for the lease less often than the holder renews it.
            await asyncio.sleep(TICK if self.leading else 4 * TICK)

    async def tick(self) -> None:
        """One look at every subscription."""
        now, records = await self.subs.storage.list_records(SPACE)
        clock = time.monotonic()
        live: set[str] = set()
        for record in records:
            state = State.decode(record.value)
            if state.deleted:
                continue
            live.add(state.id)
            if state.id in self._busy:
                continue
            work = self._due(state, now, clock)
            if work is not None:
                self._busy.add(state.id)
                self.subs.spawn(self._run(state.id, work), f"scheduled work of {state.id}")
        if live != {sid for sid, *_ in self.subs.index}:
            await self.subs._publish_index()  # a process died between a change and its index
        for gone in set(self._checked) - live:
            self._checked.pop(gone, None)
            self._discovered.pop(gone, None)

    def _due(self, state: State, now: int, clock: float) -> Any:
        wake = state.wake
        if wake is not None:
            if wake.sender is not None and wake.send_until > now:
                return None  # a live process is sending it
            if wake.lease_until is not None and wake.lease_until <= now:
                return self._expire(wake.id)
            if not wake.sent and (state.config.type == "pull-wake" or state.next_attempt_at <= now):
                return self._take_send(wake.id)
            return None
        if state.config.pattern is not None and clock - self._discovered.get(state.id, clock) >= DISCOVERY:
            self._discovered[state.id] = clock
            return self._discover()
        self._discovered.setdefault(state.id, clock)
        if clock - self._checked.get(state.id, 0.0) >= PENDING_CHECK:
            self._checked[state.id] = clock
            return self._pending()
        return None

    async def _run(self, sid: str, work: Any) -> None:
        try:
            await work(sid)
        finally:
            self._busy.discard(sid)

    def _expire(self, wake_id: str) -> Any:
        async def expire(sid: str) -> None:
            async def change(state: State | None, now: int) -> bool:
                wake = None if state is None or state.deleted else state.wake
                if state is None or wake is None or wake.id != wake_id:
                    raise Unchanged
                if wake.lease_until is None or wake.lease_until > now:
                    raise Unchanged
                state.wake = None  # the holder and its token are done with
                return await self.subs.open_wake(state, now, announce=True)

            opened, state = await self.subs.update(sid, change)
            if opened and state is not None:
                self.subs.send(state)

        return expire

    def _take_send(self, wake_id: str) -> Any:
        async def take(sid: str) -> None:
            me = self.subs.process

            async def change(state: State | None, now: int) -> None:
                wake = None if state is None or state.deleted else state.wake
                if state is None or wake is None or wake.id != wake_id or wake.sent:
                    raise Unchanged
                if wake.sender is not None and wake.send_until > now:
                    raise Unchanged
                if state.config.type == "webhook" and state.next_attempt_at > now:
                    raise Unchanged
                wake.sender, wake.send_until = me, now + SEND_CLAIM_MS

            _, state = await self.subs.update(sid, change)
            if state is not None:
                self.subs.send(state)

        return take

    def _pending(self) -> Any:
        async def pending(sid: str) -> None:
            await self.subs.evaluate(sid)

        return pending

    def _discover(self) -> Any:
        async def discover(sid: str) -> None:
            async def change(state: State | None, now: int) -> None:
                if state is None or state.deleted or not await self.subs._discover(state, glob_at_tail=False):
                    raise Unchanged

            await self.subs.update(sid, change)
            await self.subs.evaluate(sid)

        return discover
