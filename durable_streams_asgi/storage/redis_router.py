"""Where each Redis call goes: one Redis (or Sentinel's master), or the master of a key's slot in a
Redis Cluster. The storage talks to a router and never knows which of the two runs.

Both routers run a stream's scripts through a :class:`~.redis_batch.ScriptBatcher` (one per node),
other commands on the node of their key (the first argument after the command's name), and give
the storage its live notifier: plain pub/sub on one Redis, sharded pub/sub (one connection per
master) on a cluster, where the scripts publish with ``SPUBLISH`` so that a notification stays
within the shard that owns the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from ..notifier import Notifier
from ..notifier_cluster import ShardedNotifier
from .base import StorageUnavailable
from .redis_batch import ScriptBatcher
from .redis_cluster import ClusterTopology, is_cluster_url, parse_cluster_url, slot_of
from .redis_errors import UNAVAILABLE
from .redis_sentinel import is_sentinel_url, sentinel_client

# Commands that name no key: any node answers them.
_KEYLESS = frozenset({"TIME", "PING", "SCAN", "CLUSTER", "INFO"})
# How long one call follows redirections and waits out TRYAGAIN before it answers 503: a
# stream's keys split by a slot migration, or a stream of fewer keys than a script names (no
# producers yet) on the slot's target, answer TRYAGAIN until the whole slot has moved.
_PATIENCE = 3.0
_MAX_PAUSE = 0.2


def router_from_url(url: str, options: dict[str, Any]) -> tuple[Redis | None, Router]:
    """The client (None for a cluster) and the router for a Redis URL: ``redis://``, ``rediss://``,
    ``unix://``, ``redis+sentinel://`` (see :mod:`.redis_sentinel`) or ``redis+cluster://`` (see
    :mod:`.redis_cluster`), every connection made with ``options``."""
    if is_cluster_url(url):
        seeds, node_url = parse_cluster_url(url)
        return None, ClusterRouter(ClusterTopology(seeds, node_url, options))
    if is_sentinel_url(url):
        client = sentinel_client(url, options)
    else:
        client = Redis(connection_pool=BlockingConnectionPool.from_url(url, **options))
    return client, SingleRouter(client)


class LiveNotifier(Protocol):
    async def acquire(self, channel: bytes, confirm_timeout: float = ...) -> Any: ...
    def release(self, channel: bytes, ch: Any) -> None: ...
    def wake_all(self) -> None: ...
    async def ready(self, timeout: float) -> str | None: ...
    async def aclose(self) -> None: ...


class Router(Protocol):
    #: The command the scripts publish notifications with.
    publish: str

    def register(self, source: str) -> AsyncScript: ...
    def script(
        self, script: AsyncScript, stream: str | None, keys: list[str], args: tuple[Any, ...],
        resend: tuple[Any, ...] | None = None, channel: bytes | None = None,
    ) -> Awaitable[Any]: ...  # fmt: skip
    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any: ...
    async def command(self, *args: Any) -> Any: ...
    async def nodes(self) -> list[str]: ...
    async def command_on(self, node: str, *args: Any) -> Any: ...
    def notifier(self) -> LiveNotifier: ...
    async def aclose(self) -> None: ...


class SingleRouter:
    """Everything on one Redis (a standalone server, or the master that Sentinel names)."""

    publish = "PUBLISH"

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._batcher = ScriptBatcher(client)

    def register(self, source: str) -> AsyncScript:
        return self.client.register_script(source)

    def script(
        self, script: AsyncScript, stream: str | None, keys: list[str], args: tuple[Any, ...],
        resend: tuple[Any, ...] | None = None, channel: bytes | None = None,
    ) -> Awaitable[Any]:  # fmt: skip
        # The batcher's future itself, not a coroutine around it: one frame less to create and
        # to resume on every script call.
        return self._batcher.call(script, stream, keys, args, resend=resend)

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        return await script(keys=keys, args=args, client=self.client)

    async def command(self, *args: Any) -> Any:
        return await self.client.execute_command(*args)

    async def nodes(self) -> list[str]:
        return [""]

    async def command_on(self, node: str, *args: Any) -> Any:
        return await self.client.execute_command(*args)

    def notifier(self) -> LiveNotifier:
        return Notifier(self.client)

    async def aclose(self) -> None:
        await self._batcher.aclose()


class ClusterRouter:
    """Each call on the master of its key's slot, following the cluster as slots move and masters
    fail over (see :mod:`.redis_cluster`)."""

    publish = "SPUBLISH"

    def __init__(self, topology: ClusterTopology) -> None:
        self.topology = topology
        self._batchers: dict[str, ScriptBatcher] = {}

    def register(self, source: str) -> AsyncScript:
        # The script's SHA is computed here; each node loads the script on first use (NOSCRIPT).
        return AsyncScript(self.topology.any_client, source)

    def _batcher(self, node: str) -> ScriptBatcher:
        client = self.topology.client(node)
        batcher = self._batchers.get(node)
        if batcher is None or batcher.client is not client:  # (a node whose client was replaced)
            batcher = self._batchers[node] = ScriptBatcher(client)
        return batcher

    async def _routed(self, key: str | bytes, call: Callable[[str, bool, int], Awaitable[Any]]) -> Any:
        """``call(node, asking, attempt)`` on the node serving ``key``, following the cluster's
        answers; ``attempt`` counts from 0."""
        slot = slot_of(key)
        asking: str | None = None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _PATIENCE
        pause = 0.005
        attempt = 0
        while loop.time() < give_up:
            node = asking or await self.topology.node(slot)
            try:
                return await call(node, asking is not None, attempt)
            except MovedError as exc:  # (a subclass of AskError)
                self.topology.moved(exc.slot_id, exc.host, exc.port)
                asking = None
                if attempt:  # moved again: nodes that disagree for a moment, not a tight loop
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _MAX_PAUSE)
            except AskError as exc:
                asking = f"{exc.host}:{exc.port}"
            except (TryAgainError, ClusterDownError) as exc:
                asking = None
                if isinstance(exc, ClusterDownError):
                    self.topology.schedule_refresh()
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
            except UNAVAILABLE:
                # The master may have failed: look for its replica's promotion meanwhile.
                self.topology.suspect(node)
                raise
            attempt += 1
        raise StorageUnavailable("Redis Cluster kept redirecting the call (slots moving?)")

    async def script(
        self, script: AsyncScript, stream: str | None, keys: list[str], args: tuple[Any, ...],
        resend: tuple[Any, ...] | None = None, channel: bytes | None = None,
    ) -> Any:  # fmt: skip
        """``channel``: the stream's notification channel, for a script that publishes on it."""
        source: list[str] = []

        async def call(node: str, asking: bool, attempt: int) -> Any:
            # After a first attempt, the script may have run (its reply lost, and the batcher's
            # own resend answered MOVED or TRYAGAIN): from then on it is always sent as a resend,
            # which finds its own earlier run.
            sending = args if attempt == 0 or resend is None else resend
            if not asking:
                source[:] = [node]
                return await self._batcher(node).call(script, stream, keys, sending, resend=resend)
            reply = await self._batcher(node).call(script, stream, keys, sending, resend=resend, asking=True)
            if channel is not None and source:
                # Mid-migration, the slot's channels are still served by the source until the
                # slot is handed over: the target's publication reaches none of its readers.
                with contextlib.suppress(Exception):
                    await self.topology.client(source[0]).execute_command("SPUBLISH", channel, b"moved")
            return reply

        return await self._routed(keys[0], call)

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        async def call(node: str, asking: bool, attempt: int) -> Any:
            if asking:
                return await self._batcher(node).call(script, keys[0], keys, tuple(args), asking=True)
            return await script(keys=keys, args=args, client=self.topology.client(node))

        return await self._routed(keys[0], call)

    async def command(self, *args: Any) -> Any:
        name = str(args[0]).upper()
        if name in _KEYLESS or len(args) < 2:
            return await self._anywhere(*args)

        async def call(node: str, asking: bool, attempt: int) -> Any:
            client = self.topology.client(node)
            if not asking:
                return await client.execute_command(*args)
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("ASKING")
            pipe.execute_command(*args)
            return (await pipe.execute())[1]

        return await self._routed(args[1], call)

    async def _anywhere(self, *args: Any) -> Any:
        """A command that any master answers (the clock, a ping): the next master if one fails."""
        masters = await self.topology.masters()
        for i, node in enumerate(masters):
            try:
                return await self.command_on(node, *args)
            except UNAVAILABLE:
                if i == len(masters) - 1:
                    raise
        raise StorageUnavailable("no Redis Cluster master answers")

    async def nodes(self) -> list[str]:
        return await self.topology.masters()

    async def command_on(self, node: str, *args: Any) -> Any:
        try:
            return await self.topology.client(node).execute_command(*args)
        except UNAVAILABLE:
            self.topology.suspect(node)
            raise

    def notifier(self) -> LiveNotifier:
        return ShardedNotifier(self.topology)

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()
        await self.topology.aclose()
