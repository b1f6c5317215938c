"""Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]`` (any nodes, as seeds;
``rediss+cluster://`` for TLS).

:class:`ClusterTopology` knows which master serves which hash slot (``CLUSTER SLOTS``) and keeps
one client, with its own connection pool, per master. Every stream's keys share one hash tag, so
each script runs on one master; the router (``redis_router``) sends each call to its slot's
master and follows ``MOVED`` (a slot that moved: the map is updated and refreshed), ``ASK`` (a slot
being migrated: ``ASKING`` and the call on the target) and ``TRYAGAIN`` (a stream's keys split
mid-migration: again, shortly). A master that stops answering makes the map refresh, so that
requests reach its replica once the cluster has promoted it.

We keep our own map and clients instead of redis-py's ``RedisCluster`` because the hot path
pipelines a tick's scripts per connection (``redis_batch``) with its own rule for what may be sent
again after a lost connection, and the live notifier holds one pub/sub connection per shard;
both need plain per-node connections under our control, which ``RedisCluster`` keeps to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ..aio import cancel_and_wait
from .base import StorageUnavailable

logger = logging.getLogger("durable_streams_asgi.redis")

SCHEMES = ("redis+cluster", "rediss+cluster")
# At most one topology refresh per this many seconds (a refresh asks one node for the whole map).
_REFRESH_EVERY = 0.25
# While a master in the map does not answer, the map is read again this often: its replica's
# promotion is seen within this long, whatever requests do meanwhile.
_SUSPECT_EVERY = 0.5
# How long the client of a node that left the slot map stays open (for the calls under way on it).
_RETIRE_AFTER = 30.0


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """The seed nodes of a cluster URL, and a template for each node's own URL (``{host}:{port}``
    filled in), carrying the scheme and credentials."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster node is host:port, not {item!r}")
        seeds.append((host.strip("[]"), int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    scheme = "rediss" if parts.scheme == "rediss+cluster" else "redis"
    credentials = ""
    if userinfo:
        user, _, password = userinfo.partition(":")
        credentials = quote(unquote(user), safe="") + (":" + quote(unquote(password), safe="") if password else "")
        credentials += "@"
    return seeds, f"{scheme}://{credentials}{{host}}:{{port}}/0{'?' + parts.query if parts.query else ''}"


def slot_of(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


class ClusterTopology:
    """The slot map of a Redis Cluster and a client per master, kept current."""

    def __init__(self, seeds: list[tuple[str, int]], node_url: str, options: dict[str, Any]) -> None:
        self._seeds = [f"{host}:{port}" for host, port in seeds]
        self._node_url = node_url
        self._options = options
        self._slots: list[str] = []
        self._masters: list[str] = []  # the names in _slots, sorted (kept with it)
        self._clients: dict[str, Redis] = {}
        self._retired: list[Redis] = []
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -1e9
        self._closed = False
        # Masters that failed a call or a pub/sub connection and have not answered since.
        self._suspects: set[str] = set()
        self._follow_up: asyncio.TimerHandle | None = None
        #: Called with the set of master names after every change of the map.
        self.on_change: Callable[[set[str]], None] | None = None

    def client(self, name: str) -> Redis:
        """The client of node ``name`` (``host:port``), made on first use."""
        client = self._clients.get(name)
        if client is None:
            if self._closed:
                raise StorageUnavailable("the Redis Cluster storage is closed")
            host, _, port = name.rpartition(":")
            host = f"[{host}]" if ":" in host else host  # an IPv6 address, in a URL
            pool = BlockingConnectionPool.from_url(self._node_url.format(host=host, port=port), **self._options)
            client = self._clients[name] = Redis(connection_pool=pool)
        return client

    @property
    def any_client(self) -> Redis:
        """A client for what needs no particular node (an encoder, a clock, scripts' SHAs)."""
        return self.client(self._slots[0] if self._slots else self._seeds[0])

    async def node(self, slot: int) -> str:
        if not self._slots:
            await self.refresh()
        return self._slots[slot]

    async def masters(self) -> list[str]:
        """Every master, by name (``host:port``)."""
        if not self._slots:
            await self.refresh()
        return self._masters

    def moved(self, slot: int, host: str, port: int) -> None:
        """Redis said ``slot`` is served by ``host:port`` now: use that, and look at the rest."""
        if self._slots and 0 <= slot < len(self._slots):
            self._slots[slot] = f"{host}:{port}"
            self._masters = sorted(set(self._slots))
        self.schedule_refresh()

    def suspect(self, node: str) -> None:
        """A call to ``node`` failed: refresh the map now and, while the node stays in it without
        answering, every :data:`_SUSPECT_EVERY` seconds."""
        self._suspects.add(node)
        self.schedule_refresh()

    def schedule_refresh(self) -> None:
        """Refresh the map soon, in the background (a node failed, or a slot moved)."""
        if self._closed or (self._refreshing is not None and not self._refreshing.done()):
            return
        self._refreshing = asyncio.ensure_future(self._refresh())
        self._refreshing.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def refresh(self) -> None:
        """Read the map now (joining a refresh under way)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh(force=True))
        await asyncio.shield(self._refreshing)

    async def _refresh(self, force: bool = False) -> None:
        try:
            await self._read_map(force)
        finally:
            self._refreshed_at = asyncio.get_running_loop().time()  # a failed one counts too
            # Whatever this refresh found (or not), a master that does not answer is looked for
            # again soon.
            if self._suspects and not self._closed:
                if self._follow_up is not None:
                    self._follow_up.cancel()
                self._follow_up = asyncio.get_running_loop().call_later(_SUSPECT_EVERY, self.schedule_refresh)

    async def _read_map(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        wait = self._refreshed_at + _REFRESH_EVERY - loop.time()
        if wait > 0 and not force:
            await asyncio.sleep(wait)
        # Ask the masters we know first, then the seeds: any node answers for the whole cluster.
        candidates = list(dict.fromkeys([*self._slots, *self._seeds]))
        errors = []
        for name in candidates:
            try:
                reply = await asyncio.wait_for(self.client(name).execute_command("CLUSTER", "SLOTS"), 2.0)
            except Exception as exc:  # a dead or unreachable node: ask the next one
                errors.append(f"{name}: {exc or type(exc).__name__}")
                continue
            slots = self._map(reply, name)
            if slots is not None:
                self._install(slots)
                await self._check_suspects(set(slots))
                return
            errors.append(f"{name}: not every slot is served")
        raise StorageUnavailable("no Redis Cluster node gives a full slot map (" + "; ".join(errors) + ")")

    async def _check_suspects(self, masters: set[str]) -> None:
        for node in list(self._suspects):
            if node in masters:
                try:
                    await asyncio.wait_for(self.client(node).execute_command("PING"), 1.0)
                except Exception:
                    continue  # still down, and still a master in the cluster's view: look again soon
            self._suspects.discard(node)

    @staticmethod
    def _map(reply: list[Any], asked: str) -> list[str] | None:
        slots: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            if host in ("", "?"):  # "the node you asked", in the protocol's words
                host = asked.rpartition(":")[0]
            name = f"{host}:{int(master[1])}"
            slots[start : end + 1] = [name] * (end - start + 1)
        if any(slot is None for slot in slots):
            return None
        return slots  # type: ignore[return-value]

    def _install(self, slots: list[str]) -> None:
        changed = slots != self._slots
        self._slots = slots
        masters = set(slots)
        self._masters = sorted(masters)
        for name in [name for name in self._clients if name not in masters and name not in self._seeds]:
            # Not closed at once: calls under way on it finish (or fail) on their own first.
            retired = self._clients.pop(name)
            self._retired.append(retired)
            asyncio.get_running_loop().call_later(_RETIRE_AFTER, self._close_retired, retired)
        if changed:
            logger.info("Redis Cluster: %d masters serve the slots", len(masters))
            if self.on_change is not None:
                self.on_change(masters)

    def _close_retired(self, client: Redis) -> None:
        if client in self._retired and not self._closed:
            self._retired.remove(client)
            task = asyncio.ensure_future(client.aclose(close_connection_pool=True))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def aclose(self) -> None:
        self._closed = True
        if self._follow_up is not None:
            self._follow_up.cancel()
        await cancel_and_wait(self._refreshing)
        for client in [*self._clients.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await client.aclose(close_connection_pool=True)
        self._clients.clear()
        self._retired.clear()
