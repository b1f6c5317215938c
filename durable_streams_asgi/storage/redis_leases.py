"""Leases on Redis: one hash per lease, changed by one script, and an index to find dead ones.

``<prefix>{lease:<key>}:l`` holds the lease (owner, fence, value, deadline, held); each operation
is one script on it, with Redis's clock, so every process agrees on who holds it and until when.
The record outlives its release for a week (``PEXPIREAT``), so its fence keeps growing.

``<prefix>leases`` is a sorted set of held leases by deadline, the way to find expired ones
without scanning. It lives in another slot than the leases (Redis Cluster), so it is kept apart
from the scripts and treated as a hint: a lease is entered with score 0 ("look at it soon")
*before* it is taken, so a process dying between the two steps leaves a lease that is still
found; whoever looks at an entry re-scores it from the record or drops it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from .base import Lease
from .memory_leases import RETAIN_MS
from .redis_errors import mapped
from .redis_layout import _escape, _text

if TYPE_CHECKING:
    from .redis_router import Router

_SCRIPT = resources.files(__package__).joinpath("lua").joinpath("lease.lua").read_text()


class RedisLeases:
    """The lease half of :class:`~durable_streams_asgi.storage.redis.RedisStorage`; it needs only
    a router, a key prefix and the storage's command runner (which maps errors)."""

    def __init__(self, router: Router, prefix: str, command: Callable[..., Awaitable[Any]]) -> None:
        self._script = router.register(_SCRIPT)
        self._router = router
        self._prefix = prefix
        self._command = command
        self._index = f"{prefix}leases"

    def _key(self, key: str) -> str:
        return f"{self._prefix}{{lease:{_escape(key)}}}:l"

    async def _run(self, op: str, key: str, owner: str = "", fence: int = 0, ttl_ms: int = 0, value: str = "",
                   force: bool = False) -> tuple[str, Lease, bool]:  # fmt: skip
        """Run the script: its status, the lease after it, and whether the lease is taken and
        past its deadline (its holder stopped renewing it)."""
        reply = await mapped(
            self._router.run(
                self._script, [self._key(key)], [op, owner, fence, ttl_ms, value, "1" if force else "0", RETAIN_MS]
            )
        )
        status, holder, current_fence, current_value, deadline, taken, now = reply
        held = taken == 1 and int(deadline) > int(now)
        lease = Lease(key, _text(holder), int(current_fence), _text(current_value), int(deadline), held)
        return _text(status), lease, taken == 1 and not held

    async def acquire_lease(
        self, key: str, owner: str, ttl_ms: int, value: str = "", *, force: bool = False
    ) -> Lease | None:
        await self._command("ZADD", self._index, 0, key)
        status, lease, _ = await self._run("acquire", key, owner, 0, ttl_ms, value, force)
        if status != "ok":
            return None
        await self._command("ZADD", self._index, lease.expires_at_ms, key)
        return lease

    async def renew_lease(self, key: str, owner: str, fence: int, ttl_ms: int) -> bool:
        status, lease, _ = await self._run("renew", key, owner, fence, ttl_ms)
        if status == "ok":
            await self._command("ZADD", self._index, lease.expires_at_ms, key)
        return status == "ok"

    async def release_lease(self, key: str, owner: str, fence: int) -> bool:
        status, _, _ = await self._run("release", key, owner, fence)
        if status == "ok":
            await self._command("ZREM", self._index, key)
        return status == "ok"

    async def get_lease(self, key: str) -> Lease | None:
        status, lease, _ = await self._run("get", key)
        return lease if status == "ok" else None

    async def expired_leases(self, prefix: str, limit: int = 100) -> list[Lease]:
        seconds, micros = await self._command("TIME")
        now = int(seconds) * 1000 + int(micros) // 1000
        # Entries due for a look: expired leases, and leases entered just before being taken.
        candidates = await self._command("ZRANGEBYSCORE", self._index, "-inf", now, "LIMIT", 0, 4 * limit)
        found: list[Lease] = []
        for raw in candidates:
            key = _text(raw)
            if not key.startswith(prefix):
                continue
            status, lease, expired = await self._run("get", key)
            if expired:
                found.append(lease)
                if len(found) >= limit:
                    break
            elif status == "ok" and lease.held:
                await self._command("ZADD", self._index, lease.expires_at_ms, key)
            else:  # released, or forgotten
                await self._command("ZREM", self._index, key)
        return found
