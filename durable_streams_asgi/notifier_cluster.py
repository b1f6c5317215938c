"""The live notifier on a Redis Cluster: sharded pub/sub, one connection per master.

A stream's notifications are published with ``SPUBLISH`` on its channel, which shares the
stream's hash tag, so they travel only within the shard that owns the stream. Each process holds
one :class:`~durable_streams_asgi.notifier.Notifier` in sharded mode per master, and sends each
waiter to the one serving its channel's slot. The rules of the single-Redis notifier hold per
connection (a waiter's subscription is confirmed before its final check; a lost connection wakes
that connection's waiters to re-read). When a slot moves or a master fails over, the channels
concerned are dropped, their waiters woken, and they subscribe again on the slot's new master.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

from .notifier import Notifier, NotifierUnavailable, Rerouted, _Channel
from .storage.redis_cluster import ClusterTopology, slot_of

# How many times a waiter follows its channel to another master before giving up (a slot that
# moves twice while one waiter subscribes is already unusual).
_REROUTES = 3


class ShardedNotifier:
    """One sharded :class:`Notifier` per master of ``topology``."""

    def __init__(self, topology: ClusterTopology) -> None:
        self._topology = topology
        self._nodes: dict[str, Notifier] = {}
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        topology.on_change = self._masters_changed

    def _notifier(self, node: str) -> Notifier:
        notifier = self._nodes.get(node)
        if notifier is None:
            client = self._topology.client(node)
            trouble = functools.partial(self._topology.suspect, node)
            notifier = self._nodes[node] = Notifier(client, sharded=True, on_trouble=trouble)
        return notifier

    async def acquire(self, channel: bytes, confirm_timeout: float = 5.0) -> _Channel:
        if self._closed:
            raise NotifierUnavailable("notifier is closed")
        slot = slot_of(channel)
        for _ in range(_REROUTES):
            notifier = self._notifier(await self._topology.node(slot))
            try:
                return await notifier.acquire(channel, confirm_timeout)
            except Rerouted:
                await self._topology.refresh()
        raise NotifierUnavailable("the channel's slot keeps moving")

    def release(self, channel: bytes, ch: _Channel) -> None:
        ch.owner.release(channel, ch)

    def wake_all(self) -> None:
        for notifier in self._nodes.values():
            notifier.wake_all()

    async def ready(self, timeout: float) -> str | None:
        """None once a pub/sub connection is up to every master."""
        if self._closed:
            return "the live notifier is closed"
        try:
            masters = await asyncio.wait_for(self._topology.masters(), timeout)
        except Exception as exc:
            return f"the Redis Cluster's slot map is unknown: {exc}"
        answers = await asyncio.gather(*(self._notifier(node).ready(timeout) for node in masters))
        problems = [f"{node}: {answer}" for node, answer in zip(masters, answers, strict=True) if answer]
        return "; ".join(problems) or None

    def _masters_changed(self, masters: set[str]) -> None:
        """A node that no longer serves slots keeps no pub/sub connection: its waiters (woken by
        the close) subscribe again where their slots went."""
        for node in [node for node in self._nodes if node not in masters]:
            task = asyncio.ensure_future(self._nodes.pop(node).aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        # Channels whose slot moved between two masters that both stay are told by Redis
        # (an unsolicited SUNSUBSCRIBE), or refused with MOVED: the node notifier drops them.

    async def aclose(self) -> None:
        self._closed = True
        notifiers: list[Any] = list(self._nodes.values())
        self._nodes.clear()
        for notifier in notifiers:
            await notifier.aclose()
        for task in list(self._closing):
            with contextlib.suppress(BaseException):
                await task
