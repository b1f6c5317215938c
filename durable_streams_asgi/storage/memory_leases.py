"""Leases for memory storage: one process, so a dict and the process's clock are the truth."""

from __future__ import annotations

import time
from dataclasses import replace

from .base import Lease

# A released lease's record is kept this long, so that its fence keeps growing across holders.
RETAIN_MS = 7 * 24 * 3600 * 1000


class MemoryLeases:
    """The lease half of :class:`~durable_streams_asgi.storage.memory.MemoryStorage`."""

    def __init__(self) -> None:
        super().__init__()  # the storage's other halves (records)
        self._leases: dict[str, Lease] = {}

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    def _current(self, key: str, now: int) -> Lease | None:
        lease = self._leases.get(key)
        if lease is None:
            return None
        if lease.held and lease.expires_at_ms <= now:
            lease = replace(lease, held=False)
        if not lease.held and lease.expires_at_ms + RETAIN_MS <= now:
            del self._leases[key]
            return None
        return lease

    def _holds(self, key: str, owner: str, fence: int, now: int) -> bool:
        lease = self._current(key, now)
        return lease is not None and lease.held and lease.owner == owner and lease.fence == fence

    async def acquire_lease(
        self, key: str, owner: str, ttl_ms: int, value: str = "", *, force: bool = False
    ) -> Lease | None:
        now = self._now_ms()
        lease = self._current(key, now)
        if lease is not None and lease.held and lease.owner != owner and not force:
            return None
        fence = lease.fence + 1 if lease is not None else 1
        taken = Lease(key, owner, fence, value, now + ttl_ms, held=True)
        self._leases[key] = taken
        return taken

    async def renew_lease(self, key: str, owner: str, fence: int, ttl_ms: int) -> bool:
        now = self._now_ms()
        if not self._holds(key, owner, fence, now):
            return False
        self._leases[key] = replace(self._leases[key], expires_at_ms=now + ttl_ms)
        return True

    async def release_lease(self, key: str, owner: str, fence: int) -> bool:
        now = self._now_ms()
        if not self._holds(key, owner, fence, now):
            return False
        self._leases[key] = replace(self._leases[key], held=False, expires_at_ms=now)
        return True

    async def get_lease(self, key: str) -> Lease | None:
        return self._current(key, self._now_ms())

    async def expired_leases(self, prefix: str, limit: int = 100) -> list[Lease]:
        now = self._now_ms()
        found = []
        for lease in list(self._leases.values()):
            if lease.key.startswith(prefix) and lease.held and lease.expires_at_ms <= now:
                found.append(replace(lease, held=False))
                if len(found) >= limit:
                    break
        return found
