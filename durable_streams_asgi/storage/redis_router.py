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
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, TryAgainError

from ..notifier import Notifier
from ..notifier_cluster import ShardedNotifier
from .base import StorageUnavailable
from .redis_batch import ScriptBatcher
from .redis_cluster import ClusterTopology, slot_of
from .redis_errors import UNAVAILABLE

# Commands that name no key: any node answers them.
_KEYLESS = frozenset({"TIME", "PING", "SCAN", "CLUSTER", "INFO"})
# How long one call follows redirections and waits out TRYAGAIN before it answers 503: a
# stream's keys split by a slot migration, or a stream of fewer keys than a script names (no
# producers yet) on the slot's target, answer TRYAGAIN until the whole slot has moved.
_PATIENCE = 3.0
_MAX_PAUSE = 0.2


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
    async def script(
        self, script: AsyncScript, stream: str | None, keys: list[str], args: tuple[Any, ...],
        resend: tuple[Any, ...] | None = None,
    ) -> Any: ...  # fmt: skip
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

    async def script(
        self, script: AsyncScript, stream: str | None, keys: list[str], args: tuple[Any, ...],
        resend: tuple[Any, ...] | None = None,
    ) -> Any:  # fmt: skip
        return await self._batcher.call(script, stream, keys, args, resend=resend)

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
        batcher = self._batchers.get(node)
        if batcher is None:
            batcher = self._batchers[node] = ScriptBatcher(self.topology.client(node))
        return batcher

    async def _routed(self, key: str | bytes, call: Callable[[str, bool], Awaitable[Any]]) -> Any:
        """``call(node, asking)`` on the node serving ``key``, following the cluster's answers."""
        slot = slot_of(key)
        asking: str | None = None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _PATIENCE
        pause = 0.005
        while loop.time() < give_up:
            node = asking or await self.topology.node(slot)
            try:
                return await call(node, asking is not None)
            except MovedError as exc:  # (a subclass of AskError)
                self.topology.moved(exc.slot_id, exc.host, exc.port)
                asking = None
            except AskError as exc:
                asking = f"{exc.host}:{exc.port}"
            except TryAgainError:
                asking = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
            except ClusterDownError:
                asking = None
                self.topology.schedule_refresh()
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
            except UNAVAILABLE:
                # The master may have failed: look for its replica's promotion meanwhile.
                self.topology.schedule_refresh()
                raise
        raise StorageUnavailable("Redis Cluster kept redirecting the call (slots moving?)")

    async def script(
        self, script: AsyncScript, stream: str | None, keys: list[str], args: tuple[Any, ...],
        resend: tuple[Any, ...] | None = None,
    ) -> Any:  # fmt: skip
        async def call(node: str, asking: bool) -> Any:
            if asking:
                return await self._asking(node, script, keys, list(args))
            return await self._batcher(node).call(script, stream, keys, args, resend=resend)

        return await self._routed(keys[0], call)

    async def run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        async def call(node: str, asking: bool) -> Any:
            if asking:
                return await self._asking(node, script, keys, args)
            return await script(keys=keys, args=args, client=self.topology.client(node))

        return await self._routed(keys[0], call)

    async def _asking(self, node: str, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """The script on a slot's migration target: ``ASKING`` first, on the same connection."""
        client = self.topology.client(node)
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("ASKING")
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return (await pipe.execute())[1]
            except NoScriptError:
                await client.script_load(script.script)
        raise StorageUnavailable("Redis Cluster node keeps forgetting the scripts")

    async def command(self, *args: Any) -> Any:
        name = str(args[0]).upper()
        if name in _KEYLESS or len(args) < 2:
            return await self.topology.any_client.execute_command(*args)

        async def call(node: str, asking: bool) -> Any:
            client = self.topology.client(node)
            if not asking:
                return await client.execute_command(*args)
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("ASKING")
            pipe.execute_command(*args)
            return (await pipe.execute())[1]

        return await self._routed(args[1], call)

    async def nodes(self) -> list[str]:
        return await self.topology.masters()

    async def command_on(self, node: str, *args: Any) -> Any:
        return await self.topology.client(node).execute_command(*args)

    def notifier(self) -> LiveNotifier:
        return ShardedNotifier(self.topology)

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()
        await self.topology.aclose()
