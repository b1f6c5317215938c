"""The in-process API: the same streams the mounted app serves, from Python code.

    streams = DurableStreams(RedisStorage.from_url(...))
    app.mount("/v1/stream", streams.app)
    await streams.create("/chat/1", content_type="application/json")
    await streams.append_json("/chat/1", {"role": "user", "text": "hi"})

An append made here wakes HTTP readers in every process exactly as an HTTP append does: it goes
through the same storage call (and, on Redis, the same script and notification).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from starlette.applications import Starlette

from . import offsets, protocol
from .app import Authorize, durable_streams_app, streams_handler
from .drain import Drain, on_stop_signals
from .generation import Generation, GenerationRunner, WriteOptions
from .jsonmode import encode_message, join_messages, split_messages
from .protocol import ProtocolError
from .storage.base import AppendRequest, AppendResult, Producer, Storage, StreamConfig, StreamInfo
from .storage.common import DEFAULT_CONTENT_TYPE, is_json_content_type
from .storage.memory import MemoryStorage

if TYPE_CHECKING:
    from .subscriptions import Subscriptions

logger = logging.getLogger("durable_streams_asgi")


@dataclass(frozen=True)
class Chunk:
    """One read of a stream: what arrived, and where to resume."""

    #: The bytes read (for JSON streams, the messages as one JSON array).
    data: bytes
    #: For JSON streams, the messages decoded; otherwise empty.
    messages: list[Any] = field(default_factory=list)
    #: The offset to resume from (opaque; pass it back as ``offset``).
    offset: str = offsets.BEGINNING
    up_to_date: bool = False
    #: True on the last chunk of a closed stream: nothing more will ever come.
    closed: bool = False

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


def _path(path: str) -> str:
    try:
        return protocol.validate_path(path if path.startswith("/") else "/" + path)
    except ProtocolError as exc:
        raise ValueError(f"invalid stream path {path!r}: {exc.message}") from exc


class Service(Protocol):
    """A background worker that lives as long as the streams (see :meth:`DurableStreams.add_service`)."""

    def start(self) -> None: ...
    async def aclose(self) -> None: ...


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


class DurableStreams:
    """Streams over one storage, served over HTTP by :attr:`app` and used in-process by the
    methods below. Storage errors (``StreamNotFound``, ``StreamClosed``, ...) propagate as the
    documented exceptions of :mod:`durable_streams_asgi.storage.base`."""

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        mount_path: str = "/v1/stream",
        authorize: Authorize | None = None,
        shutdown_timeout: float = 8.0,
        drain_on_signals: bool = True,
        **app_options: Any,
    ) -> None:
        self.storage: Storage = storage if storage is not None else MemoryStorage()
        self.mount_path = "/" + mount_path.strip("/") if mount_path.strip("/") else ""
        self.app: Starlette = durable_streams_app(self.storage, authorize=authorize, **app_options)
        self._generations = GenerationRunner(self.storage, shutdown_timeout=shutdown_timeout)
        self._services: list[Service] = []
        self.drain_on_signals = drain_on_signals
        self._restore_signals: Callable[[], None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.drain_state: Drain = streams_handler(self.app).drain
        self.drain_state.on_begin(self._on_drain)

    # -- writing ---------------------------------------------------------------------------------

    async def create(
        self,
        path: str,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        ttl: int | None = None,
        expires_at: datetime | float | None = None,
        closed: bool = False,
        data: bytes | str | None = None,
        messages: Iterable[Any] | None = None,
    ) -> tuple[bool, StreamInfo]:
        """Create a stream (or confirm an identical one exists): ``(created, info)``.

        ``data`` is initial content; for JSON streams give ``messages`` (Python values) instead.
        Raises ``StreamExists`` when a stream with another configuration is there.
        """
        if isinstance(expires_at, datetime):
            expires_at = expires_at.timestamp()
        items: list[bytes] = []
        if messages is not None:
            items = [encode_message(m) for m in messages]
        elif data:
            raw = _as_bytes(data)
            items = split_messages(raw) if is_json_content_type(content_type) else [raw]
        config = StreamConfig(content_type=content_type, ttl_seconds=ttl, expires_at=expires_at, closed=closed)
        result = await self.storage.create(_path(path), config, items)
        return result.created, result.info

    async def append(
        self,
        path: str,
        data: bytes | str,
        *,
        content_type: str,
        close: bool = False,
        seq: str | None = None,
        producer: Producer | None = None,
    ) -> AppendResult:
        """Append raw bytes (for JSON streams, a JSON text; a top-level array is flattened)."""
        raw = _as_bytes(data)
        items = split_messages(raw) if is_json_content_type(content_type) and raw else [raw]
        return await self.storage.append(
            _path(path), AppendRequest(content_type, items, close=close, seq=seq, producer=producer)
        )

    async def append_json(
        self, path: str, *messages: Any, close: bool = False, seq: str | None = None, producer: Producer | None = None
    ) -> AppendResult:
        """Append Python values as JSON messages, one message each."""
        items = [encode_message(m) for m in messages]
        return await self.storage.append(
            _path(path), AppendRequest("application/json", items, close=close, seq=seq, producer=producer)
        )

    async def close(self, path: str) -> StreamInfo:
        """Close the stream (idempotent)."""
        result = await self.storage.append(_path(path), AppendRequest(None, [], close=True))
        return result.info

    async def delete(self, path: str) -> None:
        await self.storage.delete(_path(path))

    async def head(self, path: str) -> StreamInfo:
        return await self.storage.head(_path(path))

    # -- reading ---------------------------------------------------------------------------------

    async def read(
        self,
        path: str,
        offset: str = offsets.BEGINNING,
        *,
        live: bool = False,
        max_bytes: int = 1 << 20,
        timeout: float | None = None,
    ) -> AsyncIterator[Chunk]:
        """Read from ``offset`` (``-1``, ``now`` or an offset this server returned).

        Without ``live``, yields what is there and stops once up to date. With ``live``, goes on
        yielding as data arrives until the stream closes (or ``timeout`` seconds pass without
        data, when given).
        """
        stream = _path(path)
        start = protocol.parse_read_offset(offset)
        result = await self.storage.read(stream, start, max_bytes)
        first = True
        while True:
            if result.items or first or result.at_end:
                first = False
                is_json = result.info.is_json
                data = join_messages(result.items) if is_json else b"".join(result.items)
                yield Chunk(
                    data=data,
                    messages=[json.loads(m) for m in result.items] if is_json else [],
                    offset=offsets.encode_offset(result.next),
                    up_to_date=result.up_to_date,
                    closed=result.at_end,
                )
            if result.at_end or (result.up_to_date and not live):
                return
            position = result.next
            if result.up_to_date:
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    wait = 30.0 if deadline is None else deadline - time.monotonic()
                    if wait <= 0:
                        return
                    if await self.storage.wait_for_data(stream, position, wait):
                        break
            result = await self.storage.read(stream, position, max_bytes)

    # -- URLs and durable generations ------------------------------------------------------------

    def url_for(self, base_url: str, path: str) -> str:
        """The absolute read URL of a stream, given the host app's base URL
        (``str(request.base_url)`` in Starlette/FastAPI, ``request.build_absolute_uri("/")`` in
        Django)."""
        return base_url.rstrip("/") + self.mount_path + quote(_path(path))

    async def start_generation(
        self,
        path: str,
        source: AsyncIterable[Any],
        *,
        content_type: str = "application/json",
        linger: float = 0.005,
        max_batch_bytes: int = 64 * 1024,
        error_record: Callable[[BaseException], Any] | None = None,
        ttl: int | None = None,
        options: WriteOptions | None = None,
        create: bool = True,
        finalize: Callable[[Generation], Awaitable[None]] | None = None,
    ) -> Generation:
        """Create the stream at ``path`` (unless ``create`` is false: then it must exist), then
        write ``source`` into it from a background task that outlives the request that started
        it. The stream exists when this returns, so its URL can be handed out at once.

        ``options`` (a :class:`~durable_streams_asgi.generation.WriteOptions`) replaces the
        keyword arguments ``content_type``, ``linger``, ``max_batch_bytes`` and ``error_record``
        and adds the producer tuple, the retry budget and whether to close at the end.
        ``finalize(generation)`` runs once the writing ended, whatever the outcome. See
        :class:`~durable_streams_asgi.generation.Generation`."""
        if options is None:
            options = WriteOptions(
                content_type=content_type, linger=linger, max_batch_bytes=max_batch_bytes, error_record=error_record
            )
        config = StreamConfig(content_type=options.content_type, ttl_seconds=ttl) if create else None
        return await self._generations.start(_path(path), source, options, create=config, finalize=finalize)

    @property
    def generations(self) -> GenerationRunner:
        return self._generations

    # -- lifecycle -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Start draining (idempotent): SSE readers get a last control event and the end of
        their response, waiting long-polls are answered, new long-polls and SSE reads answer at
        once, readiness turns 503, new generations are refused with 503, and running ones get
        ``shutdown_timeout`` seconds to finish before they are interrupted (their streams end
        with an error record and are closed). Appends, creates and catch-up reads go on being
        served. With ``drain_on_signals`` (the default), SIGTERM and SIGINT call this before the
        ASGI server's own handler; call it yourself from another shutdown hook otherwise."""
        self.drain_state.begin()

    async def drain(self) -> None:
        """:meth:`begin_drain`, then wait until running generations have ended."""
        self.begin_drain()
        if self._drained is not None:
            await asyncio.shield(self._drained)

    @property
    def subscriptions(self) -> Subscriptions:
        """The subscriptions of these streams (PROTOCOL.md sections 6 and 7), in process:
        ``await streams.subscriptions.create("jobs", {...}, base_url=...)``, ``get``, ``delete``,
        ``keys.rotate()``. Started on first use."""
        return streams_handler(self.app).start_subscriptions()

    @property
    def draining(self) -> bool:
        return self.drain_state.started

    def _on_drain(self) -> None:
        logger.info("draining: ending live reads; %d generation(s) running", self._generations.running)
        self.storage.wake_all()
        self._drained = self._generations.begin_shutdown()

    def startup(self) -> None:
        """What a lifespan's startup does: start the services and, with ``drain_on_signals``,
        chain the drain in front of the server's SIGTERM/SIGINT handlers. Idempotent."""
        for service in self._services:
            service.start()
        handler = streams_handler(self.app)
        if handler.options.subscriptions:
            handler.start_subscriptions()  # wakes and retries go on with no request to start them
        if self.drain_on_signals and self._restore_signals is None:
            self._restore_signals = on_stop_signals(self.begin_drain)

    async def aclose(self) -> None:
        """Finish (or, after ``shutdown_timeout``, interrupt) running generations, then close
        the storage."""
        if self._restore_signals is not None:
            self._restore_signals()
            self._restore_signals = None
        await self._generations.shutdown()
        for service in reversed(self._services):
            await service.aclose()
        await streams_handler(self.app).aclose()  # the subscriptions, then the storage

    def add_service(self, service: Service) -> None:
        """Run ``service`` (a background worker over these streams, e.g. the chat apps' lease
        keeper) with the streams: ``start()`` in the lifespan's startup (services may also start
        themselves on first use), ``aclose()`` on shutdown after generations ended and before the
        storage closes."""
        if service not in self._services:
            self._services.append(service)

    def lifespan(self, app: Any = None) -> contextlib.AbstractAsyncContextManager[None]:
        """A lifespan for the host app: ``FastAPI(lifespan=streams.lifespan)``."""

        @contextlib.asynccontextmanager
        async def manage() -> AsyncIterator[None]:
            try:
                self.startup()
                yield
            finally:
                await self.aclose()

        return manage()
