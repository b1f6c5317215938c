"""Redis storage: Redis Streams hold the data, Lua scripts make every change atomic, pub/sub wakes
live readers in every process.

Key layout, for a stream at ``path`` (``{...}`` is the hash tag, so one stream's keys share a
Redis Cluster slot; ``{``, ``}`` and ``%`` in the path are percent-escaped):

=========================  =====================================================================
``<prefix>{<path>}:m``     hash: content type, tail, closed, TTL/expiry, Stream-Seq, fork origin
``<prefix>{<path>}:d``     stream: the data, one entry per message (JSON) or per chunk of at most
                           ``entry_size`` bytes, with entry ID ``<end position>-0``
``<prefix>{<path>}:p``     hash: producer id -> ``epoch:seq``
``<prefix>{<path>}:f``     set: the forks that read from this stream (``<fork path>\\n<fork id>``)
``<prefix>{<path>}:n``     pub/sub channel: a message after every append, close and delete
=========================  =====================================================================

Each create, append (with its validation of closure, content type, Stream-Seq and producer
epoch/seq), close, delete and reference change is one Lua script on one stream's keys, so
concurrent requests in any number of processes never interleave. Time comes from Redis (``TIME``),
so every process agrees on expiry. A stream with a TTL gets ``PEXPIREAT`` on all its keys; a stream
that forks read from is kept (``PERSIST``) and expires logically instead (``410``) until its last
fork is gone.

Forks span slots: a fork takes a reference on its source (a script on the source's slot), then is
created (a script on its own slot). Inherited data is immutable, so it is read with plain
``XRANGE`` from the source's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import uuid
import zlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ResponseError

from .. import metrics
from ..aio import cancel_and_wait
from ..notifier import NotifierUnavailable
from .base import (
    AppendRequest,
    AppendResult,
    ContentTypeMismatch,
    CreateResult,
    InvalidProducerSeq,
    Lease,
    OffsetOutOfRange,
    ProducerSeqGap,
    ReadResult,
    Record,
    SequenceConflict,
    StaleEpoch,
    StorageError,
    StorageUnavailable,
    StreamClosed,
    StreamConfig,
    StreamGone,
    StreamInfo,
    StreamNotFound,
    Watch,
)
from .common import (
    DEFAULT_CONTENT_TYPE,
    is_json_content_type,
    media_type,
    resolved_watch,
    wait_for_data,
)
from .memory_records import AppendObservers
from .redis_errors import UNAVAILABLE as _UNAVAILABLE
from .redis_errors import response_error as _response_error
from .redis_forks import ForkReferences
from .redis_layout import _entries, _escape, _fork_origin, _info, _take, _text, create_record, existing_stream
from .redis_leases import RedisLeases
from .redis_records import RedisRecords
from .redis_router import LiveNotifier, Router, SingleRouter, router_from_url
from .shared_calls import SharedCalls

logger = logging.getLogger("durable_streams_asgi.redis")

_SCRIPTS = ("create", "append", "read", "head", "delete", "fork_ref", "release")
_READ_ONLY_SCRIPTS = frozenset({"read", "head"})  # (read refreshes a sliding TTL: harmless twice)


# How long a readiness check waits for each of Redis and the pub/sub connection (seconds).
_READY_TIMEOUT = 2.0


# Parts of the fork index (see RedisStorage._indexes).
_FORK_INDEX_PARTS = 16


# Remembered names: at most this many paths, each at most this long (a path's names are about
# five times its escaped length; a client may ask for thousands of long missing paths).
_PATH_NAMES_MAX = 4096
_PATH_NAMES_LONGEST = 256


def _fork_index(prefix: str, part: int) -> str:
    return f"{prefix}{{__ds:forks:{part}}}"


def _count_appended(items: Sequence[bytes]) -> None:
    if items and metrics.current.enabled:
        metrics.current.appended(len(items), sum(map(len, items)))


def _units(items: Sequence[bytes], is_json: bool) -> int:
    """How far ``items`` move a stream's tail: messages for JSON, bytes otherwise."""
    return sum(1 for item in items if item) if is_json else sum(map(len, items))


def _load_script(name: str, publish: str) -> str:
    """The script's source, publishing with ``publish`` (``SPUBLISH`` on a cluster)."""
    lua = resources.files(__package__).joinpath("lua")
    source = lua.joinpath("common.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()
    return source.replace("redis.call('PUBLISH',", f"redis.call('{publish}',")


class StreamDataMissing(StorageError):
    """Redis lost data the metadata says exists (evicted, or a replica behind): a server fault."""


class RedisStorage(ForkReferences, AppendObservers):
    """Streams in Redis (>= 6.2, or Valkey), shared by every process that uses the same Redis.

    Build it with :meth:`from_url` (a Redis, a master behind Sentinel, or a Redis Cluster), or
    pass a ``redis.asyncio.Redis`` client created with ``decode_responses=False``. Connections
    are opened lazily on first use; call :meth:`aclose` on shutdown (the standalone server and
    the lifespan helper do).
    """

    def __init__(
        self,
        client: Redis | None = None,
        *,
        key_prefix: str = "ds:",
        entry_size: int = 512 * 1024,
        owns_client: bool = False,
        router: Router | None = None,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain '{' or '}' (they mark Redis Cluster hash tags)")
        if client is None and router is None:
            raise TypeError("RedisStorage takes a client or a router")
        self._client = client
        self._router: Router = router or SingleRouter(client)  # type: ignore[arg-type]
        self._prefix = key_prefix
        self._path_names: dict[str, tuple[list[str], bytes]] = {}
        self._entry_size = entry_size
        self._owns_client = owns_client
        self._scripts = {name: self._router.register(_load_script(name, self._router.publish)) for name in _SCRIPTS}
        self._leases = RedisLeases(self._router, key_prefix, self._command)
        self._records = RedisRecords(self._router, key_prefix, self._command)
        AppendObservers.__init__(self)
        # Append nonces: unique across processes (a random prefix) and cheap (a counter, where
        # uuid4 per append cost a urandom system call).
        self._nonce_prefix = uuid.uuid4().hex[:16]
        self._nonces = itertools.count()
        self._notifier: LiveNotifier | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._calls = SharedCalls()  # identical concurrent reads and heads: one round trip
        self.sweep_interval = 5.0

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = "ds:", **redis_options: Any) -> RedisStorage:
        """``redis://host:port/db``, ``rediss://...`` (TLS), ``unix://...``, a master found
        through Sentinel, ``redis+sentinel://host:port[,host:port...]/service[/db]``, or a Redis
        Cluster, ``redis+cluster://host:port[,host:port...]`` (any of its nodes).

        Defaults fail fast when Redis is down (requests then get 503 with Retry-After) and
        reconnect by themselves when it returns: a command that fails on a dead pooled connection
        is sent once more on a new one. That is safe because every script is idempotent per
        request (a retried append finds its own nonce). ``redis_options`` override the defaults.
        """
        options: dict[str, Any] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
            "health_check_interval": 15,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
            # A burst of requests waits (up to 5 s) for one of 256 connections instead of failing.
            "max_connections": 256,
            "timeout": 5.0,
        }
        options.update(redis_options)
        options["decode_responses"] = False
        client, router = router_from_url(url, options)
        return cls(client, router=router, key_prefix=key_prefix, owns_client=True)

    @property
    def client(self) -> Redis:
        """The Redis client (not on a cluster, which has one per master)."""
        if self._client is None:
            raise AttributeError("a Redis Cluster storage has no single client")
        return self._client

    # -- keys and plumbing -----------------------------------------------------------------------

    def _keys(self, path: str) -> list[str]:
        return self._names(path)[0]

    def _names(self, path: str) -> tuple[list[str], bytes]:
        """The stream's keys and its notification channel, remembered for recent paths (built
        on every call, they were a measurable share of an append). Never to be changed."""
        names = self._path_names.get(path)
        if names is None:
            base = f"{self._prefix}{{{_escape(path)}}}"
            names = ([f"{base}:m", f"{base}:d", f"{base}:p", f"{base}:f"], f"{base}:n".encode())
            if len(path) <= _PATH_NAMES_LONGEST:  # (what a client's long paths can pin is bounded)
                if len(self._path_names) >= _PATH_NAMES_MAX:
                    self._path_names.clear()
                self._path_names[path] = names
        return names

    def _index(self, indexed: str) -> str:
        """The part of the fork index that holds ``indexed`` (``<fork path>\n<id>\n<source>``)."""
        fork_path = indexed.partition("\n")[0]
        return _fork_index(self._prefix, zlib.crc32(fork_path.encode()) % _FORK_INDEX_PARTS)

    @property
    def _indexes(self) -> list[str]:
        """Every part of the fork index: sorted sets of forks by when to check on them next,
        spread over :data:`_FORK_INDEX_PARTS` hash slots (so over a cluster's masters), and the
        single set of earlier versions, still swept."""
        return [_fork_index(self._prefix, n) for n in range(_FORK_INDEX_PARTS)] + [f"{self._prefix}forks"]

    def _channel(self, path: str) -> bytes:
        return self._names(path)[1]

    async def _call(
        self, script: str, path: str, *args: Any, resend: tuple[Any, ...] | None = None, channel: bytes | None = None
    ) -> list[Any]:
        """Run ``script`` on ``path``'s keys. ``channel``: the stream's notification channel, for a
        script that publishes on it (the router may have to publish it again elsewhere)."""
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())
        try:
            stream = None if script in _READ_ONLY_SCRIPTS else path
            return await self._router.script(
                self._scripts[script], stream, self._keys(path), args, resend=resend, channel=channel
            )
        except _UNAVAILABLE as exc:
            metrics.current.storage_error("unavailable")
            raise StorageUnavailable(str(exc)) from exc
        except ResponseError as exc:
            metrics.current.storage_error("error")
            raise _response_error(exc) from exc

    async def _command(self, *args: Any) -> Any:
        try:
            return await self._router.command(*args)
        except _UNAVAILABLE as exc:
            metrics.current.storage_error("unavailable")
            raise StorageUnavailable(str(exc)) from exc
        except ResponseError as exc:
            metrics.current.storage_error("error")
            raise _response_error(exc) from exc

    @staticmethod
    def _status_error(status: bytes, path: str) -> StorageError:
        return StreamGone(path) if status == b"gone" else StreamNotFound(path)

    async def _time_ms(self) -> int:
        seconds, micros = await self._command("TIME")
        return int(seconds) * 1000 + int(micros) // 1000

    # -- create ----------------------------------------------------------------------------------

    async def create(self, path: str, config: StreamConfig, items: Sequence[bytes] = ()) -> CreateResult:
        if config.fork_from is not None:
            return await self._create_fork(path, config, items)
        content_type = config.content_type or DEFAULT_CONTENT_TYPE
        return await self._create(path, config, content_type, config.ttl_seconds, config.expires_at, items)

    async def _create(
        self,
        path: str,
        config: StreamConfig,
        content_type: str,
        ttl: int | None,
        expires_at: float | None,
        items: Sequence[bytes],
        *,
        stream_id: str | None = None,
        base: int = 0,
        fork_offset: int | None = None,
    ) -> CreateResult:
        is_json = is_json_content_type(content_type)
        stream_id = stream_id or uuid.uuid4().hex[:16]
        result = await self._call(
            "create",
            path,
            stream_id,
            content_type,
            media_type(content_type),
            "1" if is_json else "0",
            "" if ttl is None else str(ttl),
            "" if expires_at is None else str(round(expires_at * 1000)),
            "1" if config.closed else "0",
            create_record(config, fork_offset),
            config.fork_from or "",
            str(base),
            *_entries(items, is_json, self._entry_size),
        )
        # "ok" with our id: our own stream, whose script ran and whose reply was lost (the retry found it).
        if result[0] == b"created" or (result[0] == b"ok" and _info(result[2:]).stream_id == stream_id):
            info = _info(result[2:])
            _count_appended(items)
            if self._append_observers and items:
                self._observed(path, info.tail - _units(items, is_json), info.tail)
            return CreateResult(created=True, info=info)
        return existing_stream(result, config)

    # -- append ----------------------------------------------------------------------------------

    async def append(self, path: str, request: AppendRequest) -> AppendResult:
        producer = request.producer
        has_data = any(request.items)
        is_json = is_json_content_type(request.content_type)
        nonce = f"{self._nonce_prefix}{next(self._nonces):x}"
        channel = self._channel(path)
        head = (
            media_type(request.content_type) if has_data else "",
            "1" if request.close else "0",
            request.seq or "",
            producer.id if producer else "",
            str(producer.epoch) if producer else "0",
            str(producer.seq) if producer else "0",
            channel,
        )
        entries = _entries(request.items, is_json, self._entry_size) if has_data else ()
        # Sent again after a lost reply, the nonce is marked so the script looks for it among
        # the stream's recent appends (append.lua).
        resend = (*head, "!" + nonce, *entries)
        result = await self._call("append", path, *head, nonce, *entries, resend=resend, channel=channel)
        status = result[0]
        if status == b"ok":
            info = _info(result[1:])
            _count_appended(request.items)
            if self._append_observers and has_data:
                self._observed(path, info.tail - _units(request.items, is_json), info.tail)
            return AppendResult(
                info,
                producer_epoch=producer.epoch if producer else None,
                producer_seq=producer.seq if producer else None,
            )
        if status == b"dup":
            return AppendResult(
                _info(result[3:]), duplicate=True, producer_epoch=int(result[1]), producer_seq=int(result[2])
            )
        if status == b"closedok":
            return AppendResult(_info(result[1:]), duplicate=True)
        if status == b"closed":
            raise StreamClosed(int(result[1]))
        if status == b"ct":
            raise ContentTypeMismatch(request.content_type)
        if status == b"seq":
            raise SequenceConflict(request.seq)
        if status == b"stale":
            raise StaleEpoch(int(result[1]))
        if status == b"badseq":
            raise InvalidProducerSeq(producer.seq if producer else 0)
        if status == b"gap":
            raise ProducerSeqGap(expected=int(result[1]), received=int(result[2]))
        if status == b"unsure":
            raise StorageUnavailable("Redis connection lost; the append may have been applied (use producer headers)")
        raise self._status_error(status, path)

    # -- read ------------------------------------------------------------------------------------

    async def read(self, path: str, start: int | None, max_bytes: int) -> ReadResult:
        # One append wakes every reader of the stream at once, and they all read the same range.
        return await self._calls.run(("read", path, start, max_bytes), self._read, path, start, max_bytes)

    async def _read(self, path: str, start: int | None, max_bytes: int) -> ReadResult:
        result = await self._call("read", path, "" if start is None else str(start), str(max_bytes), "1")
        status = result[0]
        if status == b"range":
            raise OffsetOutOfRange(start or 0)
        if status != b"ok":
            raise self._status_error(status, path)
        position = int(result[1])
        info = _info(result[2:11])
        source, base = _fork_origin(result[2:11])
        items: list[bytes] = []
        size = 0
        if position < base:
            assert source is not None
            position, size = await self._read_range(source, position, base, info.is_json, max_bytes, items, size)
            if position == base and size < max_bytes:
                position, size = await self._read_own(path, position, info.tail, info.is_json, max_bytes, items, size)
        else:
            entries = result[11:]
            for i in range(0, len(entries), 2):
                position, size = _take(
                    entries[i], entries[i + 1], position, info.tail, info.is_json, max_bytes, items, size
                )
        if not items and position < info.tail:
            # The metadata promises data Redis no longer has: say so rather than answer an empty
            # read that clients would repeat forever.
            logger.error("stream %r: data from position %d is missing in Redis", path, position)
            raise StreamDataMissing(path)
        return ReadResult(info=info, start=int(result[1]), next=position, items=items)

    async def _read_own(
        self, path: str, position: int, limit: int, is_json: bool, budget: int, out: list[bytes], size: int
    ) -> tuple[int, int]:
        """Plain XRANGE reads of ``path``'s own entries: data below a snapshot tail is immutable."""
        key = self._keys(path)[1]
        count = 16
        while position < limit and (not out or size < budget):
            entries = await self._command("XRANGE", key, f"({position}", "+", "COUNT", count)
            if not entries:
                break
            before = size
            for entry_id, fields in entries:
                position, size = _take(entry_id, fields[b"d"], position, limit, is_json, budget, out, size)
                if position >= limit or size >= budget:
                    break
            # Size the next batch by what these entries weighed.
            average = max(1, (size - before) // len(entries))
            count = max(1, min(512, (budget - size) // average + 1))
        return position, size

    async def _read_range(
        self, path: str, position: int, limit: int, is_json: bool, budget: int, out: list[bytes], size: int
    ) -> tuple[int, int]:
        """Data of stream ``path`` (itself maybe a fork) from ``position`` up to ``limit``."""
        meta = self._keys(path)[0]
        stream_id, source, base = await self._command("HMGET", meta, "id", "src", "base")
        if stream_id is None:
            logger.error("fork source %r is missing in Redis", path)
            raise StreamDataMissing(path)
        base = int(base or 0)
        if position < base and source:
            position, size = await self._read_range(
                _text(source), position, min(limit, base), is_json, budget, out, size
            )
            if position < min(limit, base):
                return position, size
        return await self._read_own(path, position, limit, is_json, budget, out, size)

    async def head(self, path: str) -> StreamInfo:
        return await self._calls.run(("head", path), self._head, path)

    async def _head(self, path: str) -> StreamInfo:
        result = await self._call("head", path)
        if result[0] != b"ok":
            raise self._status_error(result[0], path)
        return _info(result[2:])

    # -- delete and fork references --------------------------------------------------------------

    async def delete(self, path: str) -> None:
        channel = self._channel(path)
        result = await self._call("delete", path, channel, channel=channel)
        status = result[0]
        if status == b"soft":
            return
        if status != b"deleted":
            raise self._status_error(status, path)
        if result[1]:
            source, member = _text(result[1]), f"{path}\n{_text(result[2])}"
            # The fork is gone; dropping its reference may fail now and is then the sweeper's job.
            await self._release_quietly(source, member, f"{member}\n{source}")

    # -- leases ----------------------------------------------------------------------------------

    async def acquire_lease(
        self, key: str, owner: str, ttl_ms: int, value: str = "", *, force: bool = False
    ) -> Lease | None:
        return await self._leases.acquire_lease(key, owner, ttl_ms, value, force=force)

    async def renew_lease(self, key: str, owner: str, fence: int, ttl_ms: int) -> bool:
        return await self._leases.renew_lease(key, owner, fence, ttl_ms)

    async def release_lease(self, key: str, owner: str, fence: int) -> bool:
        return await self._leases.release_lease(key, owner, fence)

    async def get_lease(self, key: str) -> Lease | None:
        return await self._leases.get_lease(key)

    async def expired_leases(self, prefix: str, limit: int = 100) -> list[Lease]:
        return await self._leases.expired_leases(prefix, limit)

    # -- records ---------------------------------------------------------------------------------

    async def get_record(self, space: str, key: str) -> Record | None:
        return await self._records.get_record(space, key)

    async def put_record(self, space: str, key: str, value: bytes, expected_version: int) -> Record:
        return await self._records.put_record(space, key, value, expected_version)

    async def delete_record(self, space: str, key: str, expected_version: int) -> None:
        await self._records.delete_record(space, key, expected_version)

    async def list_records(self, space: str) -> tuple[int, list[Record]]:
        return await self._records.list_records(space)

    async def scan_streams(self, prefix: str, cursor: str = "", count: int = 1000) -> tuple[list[str], str]:
        return await self._records.scan_streams(prefix, cursor, count)

    # -- live ------------------------------------------------------------------------------------

    async def wait_for_data(self, path: str, position: int, timeout: float) -> bool:
        return await wait_for_data(self, path, position, timeout)

    def _live(self) -> LiveNotifier:
        """This storage's notifier, made on first use (it connects lazily too)."""
        if self._notifier is None:
            self._notifier = self._router.notifier()
        return self._notifier

    async def watch(self, path: str, position: int) -> Watch:
        notifier, channel = self._live(), self._channel(path)
        try:
            ch = await notifier.acquire(channel)
        except NotifierUnavailable as exc:
            raise StorageUnavailable(str(exc)) from exc
        # Subscribed and confirmed: from here on, any change resolves ``future``. Then the final
        # "is there new data?" check, so that no write slips between it and the wait. Waiters
        # subscribed together share it, but only one begun after this point.
        confirmed = self._calls.moment()
        future = ch.future
        try:
            try:
                info = await self._calls.run(("head", path), self._head, path, since=confirmed)
            except (StreamNotFound, StreamGone):
                info = None
        except BaseException:
            notifier.release(channel, ch)
            raise
        if info is None or info.tail > position or info.closed:
            notifier.release(channel, ch)
            return resolved_watch()
        return Watch(future, functools.partial(notifier.release, channel, ch))

    def wake_all(self) -> None:
        if self._notifier is not None:
            self._notifier.wake_all()

    async def ready(self) -> str | None:
        try:
            nodes = await asyncio.wait_for(self._router.nodes(), _READY_TIMEOUT)
            for node in nodes:  # every master of a cluster: each serves a share of the streams
                try:
                    await asyncio.wait_for(self._router.command_on(node, "PING"), _READY_TIMEOUT)
                except _UNAVAILABLE as exc:
                    raise StorageUnavailable(f"{node or 'Redis'}: {exc}") from exc
        except (StorageError, asyncio.TimeoutError) as exc:
            return f"Redis does not answer: {exc or 'timeout'}"
        return await self._live().ready(_READY_TIMEOUT)

    async def aclose(self) -> None:
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        if self._notifier is not None:
            await self._notifier.aclose()
            self._notifier = None
        await self._router.aclose()
        if self._owns_client and self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose(close_connection_pool=True)
