"""Script calls made in the same event-loop tick share one round trip to Redis.

Under load, one tick of the loop starts many requests (64 appends arrive together, or one append
wakes the readers of 100 streams); sent one by one, each takes a connection from the pool, a
write and a read, and Redis reads each on its own. Gathered, they go out as one pipelined write
on one connection and come back in order: fewer system calls on both sides and fewer pool
round trips, which is most of what an append costs. A call made alone goes out at the end of
its tick, so an idle server adds no delay.

Failure handling follows redis-py's own (one retry on a fresh connection for a connection
error), with one extra rule: a call is not sent again while another unanswered call in the same
batch changes the same stream, since the retried script could not tell its own earlier run apart
from the other's (see the nonce in ``append.lua``). Those calls fail with ``StorageUnavailable``.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from .base import StorageUnavailable

if sys.version_info >= (3, 11, 3):
    from asyncio import timeout as _timeout
else:  # redis-py depends on this backport there, and picks it the same way
    from async_timeout import timeout as _timeout

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# "Is there unread data, or has the server closed it?": can_read() since redis-py 8, which
# deprecates the older name.
_CAN_READ = "can_read" if hasattr(AbstractConnection, "can_read") else "can_read_destructive"
# Round trips per batch: the first, one after a lost connection, and reloads of forgotten scripts.
_MAX_ROUNDS = 4


def _pack_into(out: list[bytes], args: Sequence[Any], encoding: str, errors: str) -> None:
    """RESP-encode ``args`` onto ``out``: what redis-py's packer does for the types scripts take
    (bytes, str, int), at a fraction of its cost, which was a tenth of an append's."""
    append = out.append
    for arg in args:
        kind = type(arg)
        if kind is str:
            arg = arg.encode(encoding, errors)
        elif kind is not bytes:
            if isinstance(arg, int):
                arg = b"%d" % arg
            elif isinstance(arg, (bytes, str)):  # subclasses
                arg = arg.encode(encoding, errors) if isinstance(arg, str) else bytes(arg)
            else:
                raise TypeError(f"script arguments are bytes, str or int, not {type(arg).__name__}")
        if len(arg) <= _INLINE:
            append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        else:  # not copied here: the write joins it once
            append(b"$%d\r\n" % len(arg))
            append(arg)
            append(b"\r\n")


# Arguments up to this size are framed in one piece (one formatting instead of three appends).
_INLINE = 1024
# Packed "EVALSHA <sha> <number of keys> <keys...>" by (sha, keys): a stream's keys and a script's
# hash are the same in every call on it, and packing them was most of a call's encoding.
_PREFIXES_MAX = 4096
_PREFIX_LONGEST = 1536  # (a stream's four keys from a path of up to about 256 characters)


_ASKING = b"*1\r\n$6\r\nASKING\r\n"


class _Call:
    __slots__ = ("answered", "asking", "future", "keys", "missing", "packed", "resend", "script", "stream")

    def __init__(
        self,
        script: AsyncScript,
        stream: str | None,
        packed: list[bytes],
        future: asyncio.Future[Any],
        keys: list[str],
        resend: tuple[Any, ...] | None,
        asking: bool = False,
    ) -> None:
        self.script = script
        self.stream = stream
        self.packed = packed
        self.future = future
        self.keys = keys
        #: The arguments to send instead if the call is sent again after a lost connection.
        self.resend = resend
        # Whether Redis's reply to the latest sending was read: by position on the connection,
        # not by the future, which a caller that left has cancelled whatever Redis did.
        self.answered = False
        #: Redis answered NOSCRIPT to the latest sending: it did not run.
        self.missing = False
        #: Sent after ``ASKING`` on the same connection (a Redis Cluster slot being migrated).
        self.asking = asking


class ScriptBatcher:
    """Runs ``EVALSHA`` calls in pipelined batches, one batch per event-loop tick.

    ``call`` resolves to the script's reply, or raises what redis-py would (``ResponseError``
    for an error reply, ``ConnectionError``/``TimeoutError`` when Redis cannot be reached).
    Calls of one tick go out on one connection in the order they were made; a call resent
    after a lost connection or a forgotten script may be overtaken by a later tick's calls.
    """

    def __init__(self, client: Redis) -> None:
        self.client = client
        encoder = client.connection_pool.get_encoder()
        self._encoding: str = encoder.encoding
        self._errors: str = encoder.encoding_errors
        self._queue: list[_Call] = []
        self._prefixes: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The connection of the last batch, kept for the next one: taking one from the pool and
        # giving it back costs more than a small batch's calls do.
        self._idle: Any = None
        self._closed = False

    def call(
        self,
        script: AsyncScript,
        stream: str | None,
        keys: list[str],
        args: tuple[Any, ...],
        *,
        resend: tuple[Any, ...] | None = None,
        asking: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue ``script`` for this tick's batch; returns the future of its reply (see the
        class), not a coroutine: every caller awaits it at once, and each script call is spared
        a frame. ``stream`` names the stream a writing script changes (None for one that only
        reads): it decides what may be sent again after a connection is lost.
        ``resend``: the arguments to send instead in that case (a script that must know it may
        have run already). ``asking``: precede it with ``ASKING`` (Redis Cluster, a slot being
        migrated to this node)."""
        # Encoded here, so that an argument that cannot be encoded fails its own call only.
        packed = self._pack_call(script.sha, keys, args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(_Call(script, stream, packed, future, keys, resend, asking))
        return future

    def _pack_call(self, sha: str, keys: list[str], args: tuple[Any, ...]) -> list[bytes]:
        """``EVALSHA sha len(keys) *keys *args``, RESP-encoded, its start taken from the cache."""
        cache = self._prefixes
        key = (sha, tuple(keys))
        prefix = cache.get(key)
        if prefix is None:
            parts: list[bytes] = []
            _pack_into(parts, (b"EVALSHA", sha, len(keys), *keys), self._encoding, self._errors)
            prefix = b"".join(parts)
            if len(prefix) <= _PREFIX_LONGEST:
                if len(cache) >= _PREFIXES_MAX:
                    cache.clear()
                cache[key] = prefix
        out = [b"*%d\r\n" % (3 + len(keys) + len(args)), prefix]
        _pack_into(out, args, self._encoding, self._errors)
        return out

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        if not queue:
            return
        # One batch, however large: splitting it over connections would let its parts overtake
        # each other (a producer's sequence numbers must arrive in order).
        task = asyncio.ensure_future(self._run(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Call]) -> None:
        try:
            await self._send(batch)
        except BaseException as exc:  # every caller must hear about it, cancellation included
            error = exc if isinstance(exc, Exception) else StorageUnavailable("Redis call interrupted")
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        # No caller is ever left waiting, whatever path the rounds took.
        for call in batch:
            if not call.future.done():
                call.future.set_exception(StorageUnavailable("Redis call not settled"))

    async def _take(self) -> Any:
        connection, self._idle = self._idle, None
        if connection is None:
            return await self.client.connection_pool.get_connection()
        # As the pool checks its own: unread data or a closed socket (the server went away while
        # it was idle) means a fresh connection, before anything is sent on it.
        try:
            dirty = connection.is_connected and await getattr(connection, _CAN_READ)()
        except _CONNECTION_ERRORS:
            dirty = True
        if dirty:
            await connection.disconnect()  # (it connects again on the next send)
        return connection

    async def _send(self, batch: list[_Call]) -> None:
        pool = self.client.connection_pool
        connection = await self._take()
        kept = False
        try:
            pending = batch
            retried = False
            rounds = 0
            while pending:
                rounds += 1
                if rounds > _MAX_ROUNDS:
                    raise StorageUnavailable("Redis keeps forgetting the scripts (SCRIPT FLUSH in a loop?)")
                try:
                    pending = await self._round_trip(connection, pending)
                except _CONNECTION_ERRORS as exc:
                    await connection.disconnect()
                    if retried:
                        raise
                    retried = True
                    unsettled = [call for call in pending if not call.answered or call.missing]
                    pending = self._mark_resent(self._retryable(unsettled, exc))
            if self._idle is None and not self._closed:  # every reply read: clean
                self._idle, kept = connection, True
        except BaseException:
            # Replies may be left unread on the socket: never hand it back to the pool like that.
            await connection.disconnect()
            raise
        finally:
            if not kept:
                await pool.release(connection)

    async def _round_trip(self, connection: Any, batch: list[_Call]) -> list[_Call]:
        """Send the batch and settle every call; return the calls to send again (scripts that
        Redis had forgotten, now loaded again)."""
        # One deadline for the whole round trip instead of redis-py's one per reply.
        limit = connection.socket_timeout
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + limit if limit else None
        try:
            async with _timeout(limit if limit else None):
                missing = await self._exchange(connection, batch, deadline)
        except asyncio.TimeoutError as exc:
            raise RedisTimeoutError("Timeout talking to Redis") from exc
        if metrics.current.enabled:
            metrics.current.storage_round_trip(loop.time() - began, len(batch))
        return missing

    async def _exchange(self, connection: Any, batch: list[_Call], deadline: float | None) -> list[_Call]:
        packed: list[bytes] = []
        for call in batch:
            call.answered = call.missing = False
            if call.asking:
                packed.append(_ASKING)
            packed.extend(call.packed)
        # Sent under the round trip's own deadline (see _round_trip) rather than redis-py's: with a
        # socket timeout it wraps each send in asyncio.wait_for, a task and a timer per batch
        # (and, before Python 3.12, a place where a cancellation can be lost).
        socket_timeout, connection.socket_timeout = connection.socket_timeout, None
        try:
            await connection.send_packed_command(packed)
        finally:
            connection.socket_timeout = socket_timeout
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            # The deadline passed while a reconnection's handshake or the send waited: the
            # replies below are read without a timeout of their own, so do not go on as if there
            # were time left.
            raise asyncio.TimeoutError
        missing: list[_Call] = []
        for call in batch:
            try:
                if call.asking:
                    await connection.read_response(timeout=math.inf)  # +OK
                reply = await connection.read_response(timeout=math.inf)
            except NoScriptError:
                call.answered = call.missing = True
                missing.append(call)
                continue
            except ResponseError as exc:
                call.answered = True
                if not call.future.done():
                    call.future.set_exception(exc)
                continue
            call.answered = True
            if not call.future.done():
                call.future.set_result(reply)
        for script in {id(call.script): call.script for call in missing}.values():
            await connection.send_command("SCRIPT", "LOAD", script.script)
            await connection.read_response(timeout=math.inf)
        return missing

    @staticmethod
    def _retryable(unanswered: list[_Call], exc: Exception) -> list[_Call]:
        """The unanswered calls that may be sent again: not those of a caller that left, and no
        writing call whose stream another unanswered writing call also changes (Redis may have
        run both; the script recognises only the stream's last write as already done). Every
        unanswered call counts for that, whether its caller is still waiting or not."""
        # (A call answered NOSCRIPT did not run: it counts for nothing and is sent again.)
        counts = Counter(call.stream for call in unanswered if call.stream is not None and not call.missing)
        retry = []
        for call in unanswered:
            if call.future.done():
                continue
            if call.stream is not None and not call.missing and counts[call.stream] > 1:
                call.future.set_exception(StorageUnavailable(f"Redis connection lost: {exc}"))
            else:
                retry.append(call)
        return retry

    def _mark_resent(self, calls: list[_Call]) -> list[_Call]:
        for call in calls:
            if call.resend is not None:
                sha = call.script.sha
                call.packed = self._pack_call(sha, call.keys, call.resend)
                call.resend = None
        return calls

    async def aclose(self) -> None:
        """Send what this tick has queued, and wait for batches under way (their callers are
        waiting for them)."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._closed = True
        connection, self._idle = self._idle, None
        if connection is not None:
            await self.client.connection_pool.release(connection)
