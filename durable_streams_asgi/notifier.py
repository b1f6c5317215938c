"""Per-process live notifier over Redis pub/sub.

One pub/sub connection and one listener task per process, and a map from channel (one per stream)
to the local waiters (counted by :meth:`Notifier.acquire` and :meth:`Notifier.release`). A
channel is subscribed when its first local waiter arrives and unsubscribed when its last one has
been gone for a moment (``_LINGER``: live readers leave between messages).
All waiters of a channel share one future, resolved (and replaced) by each message, so a write
costs the same however many readers wait.

Pub/sub only wakes readers; the data is always re-read from Redis. Because a message published
before a subscription is confirmed is lost, a waiter first waits for the confirmation, then takes
the channel's future, and only then makes its final "is there new data?" check: no write can slip
between the check and the wait. When the connection drops, every waiter is woken to re-read (a
message may have been lost while it was down) and the subscriptions are restored.

On a Redis Cluster the notifier is sharded (``SSUBSCRIBE``): one per master, behind
:class:`~durable_streams_asgi.notifier_cluster.ShardedNotifier`. A channel whose slot leaves the
master (Redis then unsubscribes it by itself) or that the master refuses (``MOVED``) is dropped:
its waiters are woken to re-read and come back through the router, to the slot's new master.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ResponseError

from .aio import cancel_and_wait
from .storage.common import wait_resolved

logger = logging.getLogger("durable_streams_asgi.notifier")

# How long the listener blocks in one read: bounds how long a silently dead connection goes unseen
# (redis-py pings the connection between reads once its health check interval has passed).
_READ_TIMEOUT = 5.0
_MAX_BACKOFF = 5.0


class NotifierUnavailable(Exception):
    """The subscription could not be confirmed: Redis is unreachable."""


class Rerouted(NotifierUnavailable):
    """The channel's slot is served by another master now: subscribe there (sharded mode)."""


# How long a channel stays subscribed after its last local waiter left. A live reader leaves its
# wait to read and send what woke it, then comes straight back: without this it would pay an
# UNSUBSCRIBE, a SUBSCRIBE and the wait for its confirmation on every message.
_LINGER = 2.0


class _Channel:
    __slots__ = ("_confirmation", "confirmed", "dropped", "future", "linger", "owner", "waiters")

    def __init__(self, owner: Notifier) -> None:
        self.owner = owner
        self.waiters = 0
        #: Let go of by the notifier (its slot moved, or the notifier closed): subscribe anew.
        self.dropped = False
        #: Redis confirmed the subscription (and nothing since may have lost a message).
        self.confirmed = False
        self._confirmation: asyncio.Future[None] | None = None
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.linger: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
        self.future = asyncio.get_running_loop().create_future()

    def invalidate(self) -> None:
        """Messages may have been lost: wake everyone to re-read, and wait for a new confirmation."""
        self.confirmed = False
        self.wake()

    def drop(self) -> None:
        """Wake everyone to re-read, and release waiters still waiting for a confirmation."""
        self.dropped = True
        self.invalidate()
        confirmation, self._confirmation = self._confirmation, None
        if confirmation is not None and not confirmation.done():
            confirmation.set_result(None)

    def confirm(self) -> None:
        self.confirmed = True
        confirmation, self._confirmation = self._confirmation, None
        if confirmation is not None and not confirmation.done():
            confirmation.set_result(None)

    def confirmation(self) -> asyncio.Future[None]:
        """Resolved at the next confirmation; shared by every waiter (never cancel it)."""
        if self._confirmation is None:
            self._confirmation = asyncio.get_running_loop().create_future()
            if self.dropped:  # nothing will confirm it: the waiter goes elsewhere at once
                self._confirmation.set_result(None)
        return self._confirmation


class _PubSub(PubSub):
    """redis-py's PubSub, telling us if it ever reconnects by itself (it resubscribes, but what
    was published meanwhile is gone, so our waiters must re-read)."""

    on_reconnect: Any = None

    async def on_connect(self, connection: Any) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect([*self.channels, *self.shard_channels])
        await super().on_connect(connection)


class Notifier:
    """Wake local waiters when a channel gets a message. Create one per process and event loop."""

    def __init__(self, client: Redis, *, sharded: bool = False, on_trouble: Callable[[], None] | None = None) -> None:
        self._client = client
        self._sharded = sharded
        self._subscribe, self._unsubscribe = ("ssubscribe", "sunsubscribe") if sharded else ("subscribe", "unsubscribe")
        #: Sharded mode: called when the connection fails or a slot moved (the map may be stale).
        self._on_trouble = on_trouble
        self._channels: dict[bytes, _Channel] = {}
        # SUBSCRIBE/UNSUBSCRIBE commands sent but not yet confirmed, per channel: a channel counts
        # as subscribed only once every command for it has been answered.
        self._outstanding: dict[bytes, int] = {}
        self._pubsub: _PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._saved_retry: Any = None
        # Resolved while a pub/sub connection is up (readiness probes wait on it).
        self._up: asyncio.Future[None] | None = None

    # -- waiting -------------------------------------------------------------------------------

    async def acquire(self, channel: bytes, confirm_timeout: float = 5.0) -> _Channel:
        """Count one more local waiter on ``channel``; return once Redis confirmed the subscription.

        From then on, anything published on ``channel`` resolves the returned channel's
        ``future`` (and replaces it with a new one). Every successful call must be paired with
        :meth:`release`. Raises :class:`NotifierUnavailable` when the subscription cannot be
        confirmed within ``confirm_timeout`` seconds.
        """
        if self._closed:
            raise NotifierUnavailable("notifier is closed")
        ch = self._channels.get(channel)
        if ch is None:
            ch = self._channels[channel] = _Channel(self)
        elif ch.linger is not None:
            ch.linger.cancel()  # back before the channel was let go: it is still subscribed
            ch.linger = None
        ch.waiters += 1
        try:
            if ch.waiters == 1 and not ch.confirmed:
                # Shielded: a waiter cancelled half-way must not leave a command half-counted.
                await asyncio.shield(self._spawn(self._send(self._subscribe, channel)))
            else:
                self._ensure_listener()
            # A shared future and a timer, not a task per waiter: a thousand readers arriving at
            # once wait for the same confirmation.
            if not ch.confirmed and not await wait_resolved(ch.confirmation(), confirm_timeout):
                raise NotifierUnavailable("subscription not confirmed")
            if ch.dropped:
                raise Rerouted("the channel's slot moved")
        except BaseException:
            self.release(channel, ch)
            raise
        return ch

    def release(self, channel: bytes, ch: _Channel) -> None:
        """One waiter fewer (see :meth:`acquire`)."""
        ch.waiters -= 1
        if ch.waiters == 0 and self._channels.get(channel) is ch and not self._closed:
            ch.linger = asyncio.get_running_loop().call_later(_LINGER, self._let_go, channel, ch)

    def _let_go(self, channel: bytes, ch: _Channel) -> None:
        """The last waiter left a while ago and none came back: unsubscribe."""
        ch.linger = None
        if ch.waiters == 0 and self._channels.get(channel) is ch and not self._closed:
            del self._channels[channel]
            self._spawn(self._send(self._unsubscribe, channel))

    def wake_all(self) -> None:
        """Wake every local waiter to re-read (the subscriptions stay as they are)."""
        for ch in self._channels.values():
            ch.wake()

    async def ready(self, timeout: float) -> str | None:
        """None once a pub/sub connection is up (connecting it if none is), else why not."""
        if self._closed:
            return "the live notifier is closed"
        self._ensure_listener()
        if self._connected(self._pubsub):
            return None
        if self._up is None or self._up.done():
            self._up = asyncio.get_running_loop().create_future()
        if await wait_resolved(self._up, timeout):
            return None
        return "the live notifier cannot connect to Redis pub/sub"

    # -- pub/sub plumbing ------------------------------------------------------------------------
    #
    # Only the listener task connects. Each connection is a generation: the listener opens it,
    # subscribes every channel that has waiters in one command, reads until anything fails, then
    # wakes every waiter, drops the connection and starts a new generation. Waiters' own
    # SUBSCRIBE/UNSUBSCRIBE commands go out on the current generation when there is one; if one
    # fails, the next generation resubscribes what is needed.

    @staticmethod
    def _connected(pubsub: _PubSub | None) -> bool:
        return pubsub is not None and pubsub.connection is not None and pubsub.connection.is_connected

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a subscription command as a task of the notifier's own, not of a waiter."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ensure_listener(self) -> None:
        if not self._closed and (self._listener is None or self._listener.done()):
            self._listener = asyncio.create_task(self._listen(), name="durable-streams-notifier")
            self._listener.add_done_callback(self._listener_ended)

    async def _send(self, command: str, channel: bytes) -> None:
        self._ensure_listener()
        pubsub = self._pubsub
        if pubsub is None or not self._connected(pubsub):
            # Between generations (or the connection just died): the listener's next generation
            # subscribes every channel with waiters. Sending now would let redis-py reconnect this
            # connection behind the listener's back.
            return
        self._outstanding[channel] = self._outstanding.get(channel, 0) + 1
        try:
            await getattr(pubsub, command)(channel)
        except Exception as exc:
            # Not sent, so no answer will come; the listener's read fails too and reconnects.
            if self._pubsub is pubsub:
                left = self._outstanding.get(channel, 0) - 1
                if left > 0:
                    self._outstanding[channel] = left
                else:
                    self._outstanding.pop(channel, None)
            logger.debug("pub/sub %s failed: %s", command, exc)

    def _on_connect(self, resubscribing: list[bytes]) -> None:
        """redis-py reconnected on its own and is resubscribing ``resubscribing``."""
        self._outstanding = {channel: 1 for channel in resubscribing}
        self._wake_all("pub/sub connection re-established")
        if self._sharded:
            # It would send every shard channel in one SSUBSCRIBE, which a cluster refuses
            # (CROSSSLOT): refuse the connection, and the listener starts a generation of its own.
            raise ConnectionError("pub/sub reconnects through the notifier's listener")

    def _drop(self, channels: list[bytes], why: str) -> None:
        """Sharded mode: let these channels go (their waiters re-read and subscribe anew, through
        the router), and have the slot map looked at."""
        if channels:
            logger.info("%s; waking waiters on %d channels to subscribe anew", why, len(channels))
        for channel in channels:
            self._outstanding.pop(channel, None)  # (a command refused, or never to be answered)
            ch = self._channels.pop(channel, None)
            if ch is not None:
                if ch.linger is not None:
                    ch.linger.cancel()
                ch.drop()
        if self._on_trouble is not None:
            self._on_trouble()

    def _wake_all(self, why: str) -> None:
        if self._channels:
            logger.warning("%s; waking waiters on %d channels to re-read", why, len(self._channels))
        for ch in self._channels.values():
            ch.invalidate()  # anything may have been published while we were away: re-read

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "pong":
            return
        channel: bytes = message["channel"]
        if kind == "sunsubscribe" and channel not in self._outstanding:
            # Not ours: Redis let the channel go because its slot left this master.
            self._drop([channel], "a live channel's slot moved to another master")
        elif kind in ("subscribe", "unsubscribe", "ssubscribe", "sunsubscribe"):
            left = self._outstanding.get(channel, 0) - 1
            if left > 0:
                self._outstanding[channel] = left
                return
            self._outstanding.pop(channel, None)
            ch = self._channels.get(channel)
            if ch is not None:
                if kind == self._subscribe:
                    ch.confirm()
                else:
                    # The last command for this channel was an unsubscribe, but waiters came back.
                    ch.invalidate()
                    self._spawn(self._send(self._subscribe, channel))
            elif kind == self._subscribe:
                # Subscribed with nobody left waiting (they left while it was in flight).
                self._spawn(self._send(self._unsubscribe, channel))
        elif kind in ("message", "smessage"):
            ch = self._channels.get(channel)
            if ch is not None:
                ch.wake()
        # "pong" (our liveness check) needs nothing beyond having been heard.

    async def _connect(self) -> _PubSub:
        pubsub = _PubSub(self._client.connection_pool)
        try:
            await pubsub.connect()
            connection = pubsub.connection
            assert connection is not None
            # Failures surface to the listener, which starts a new generation: redis-py must not
            # retry or reconnect behind our back. (Restored before the connection goes back to
            # the pool.)
            self._saved_retry = connection.retry
            connection.retry = Retry(NoBackoff(), 0)
            self._outstanding = {}
            channels = list(self._channels)
            if channels:
                self._outstanding = {channel: 1 for channel in channels}
                if self._sharded:  # one slot per command
                    for channel in channels:
                        await pubsub.ssubscribe(channel)
                else:
                    await pubsub.subscribe(*channels)
        except BaseException:
            await self._discard(pubsub)
            raise
        pubsub.on_reconnect = self._on_connect
        self._pubsub = pubsub
        if self._up is not None and not self._up.done():
            self._up.set_result(None)
        # Waiters that arrived while we subscribed found no connection to send on: catch up.
        for channel in [c for c in self._channels if c not in self._outstanding]:
            self._spawn(self._send(self._subscribe, channel))
        return pubsub

    async def _discard(self, pubsub: _PubSub) -> None:
        if pubsub.connection is not None and self._saved_retry is not None:
            pubsub.connection.retry = self._saved_retry
        with contextlib.suppress(Exception):
            await pubsub.aclose()

    async def _listen(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                pubsub = await self._connect()
                backoff = 0.05
                heard = asyncio.get_running_loop().time()
                pinged = False
                while True:
                    try:
                        message = await pubsub.get_message(timeout=_READ_TIMEOUT)
                    except AskError as exc:  # (MovedError too)
                        if not self._sharded:
                            raise
                        # One SSUBSCRIBE refused: this master no longer serves that slot. Only its
                        # channels go elsewhere; the connection and the other channels stay.
                        moved = [c for c in self._channels if key_slot(c) == exc.slot_id]
                        self._drop(moved, f"a live channel's slot is served elsewhere ({exc})")
                        message = None
                    now = asyncio.get_running_loop().time()
                    if message is not None:
                        heard, pinged = now, False
                        self._handle(message)
                    elif now - heard >= _READ_TIMEOUT:
                        # Silence: prove the connection is alive (a half-open TCP connection
                        # reads as silence forever). No answer by the next timeout: reconnect.
                        if pinged:
                            raise ConnectionError("no answer to PING on the pub/sub connection")
                        await pubsub.ping()
                        pinged = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                pubsub, self._pubsub = self._pubsub, None
                self._outstanding = {}
                if self._sharded and isinstance(exc, ResponseError):
                    # MOVED, CLUSTERDOWN...: this master does not serve (all of) these channels.
                    self._drop(list(self._channels), f"pub/sub refused: {exc}")
                elif self._sharded and self._on_trouble is not None:
                    self._on_trouble()
                self._wake_all(f"pub/sub connection lost ({exc}); reconnecting in {backoff:.2f}s")
                if pubsub is not None:
                    await self._discard(pubsub)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _listener_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        # Never die silently: log, wake everyone, and start again.
        logger.error("pub/sub listener stopped unexpectedly; restarting", exc_info=exc)
        self._pubsub = None
        self._wake_all("pub/sub listener restarted")
        self._ensure_listener()

    async def aclose(self) -> None:
        self._closed = True
        await cancel_and_wait([task for task in (self._listener, *self._tasks) if task is not None])
        for ch in self._channels.values():
            if ch.linger is not None:
                ch.linger.cancel()
            ch.drop()
        self._channels.clear()
        if self._pubsub is not None:
            await self._discard(self._pubsub)
            self._pubsub = None
