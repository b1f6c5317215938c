"""Durable generations: an async iterable (LLM tokens, AI SDK UI message chunks, any producer)
written into a stream by a background task that outlives the HTTP request that started it.

The task batches what arrives within ``linger`` seconds into one append (an LLM emits many tiny
tokens; one write each would cost a round trip each), writes with idempotent producer headers (so
a retried append never duplicates; appends are retried with backoff while the storage is
unavailable), closes the stream when the source ends, and when the source fails appends a final
error record and closes. A generation whose stream another writer closed, or whose producer epoch
another writer passed, stops (and closes its source): that is how a stop or a takeover from
another process ends it. On shutdown running generations get ``shutdown_timeout`` seconds to
finish, then are interrupted (error record, close).

The response helpers implement the contract of ``@durable-streams/aisdk-transport``: ``immediate``
answers 201 with ``Location`` and ``{"streamUrl"}`` at once; ``await`` sends the headers at once
and the body ``{"streamUrl", "finalOffset"}`` when the generation ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import JSONResponse, Response, StreamingResponse

from . import metrics, offsets
from .aio import cancel_and_wait
from .jsonmode import encode_message
from .storage.base import (
    AppendRequest,
    AppendResult,
    Producer,
    StaleEpoch,
    Storage,
    StorageError,
    StorageUnavailable,
    StreamClosed,
    StreamConfig,
)
from .storage.common import is_json_content_type

logger = logging.getLogger("durable_streams_asgi.generation")

#: How long an interrupted generation has to write its end (what it received, the reason, the
#: close) before it is cancelled again, which cuts that short: the storage answers in
#: milliseconds, or is failing over (a few seconds), or is down and nothing could be written.
CLEANUP_SECONDS = 5.0


def default_error_record(exc: BaseException, is_json: bool) -> Any:
    """What a failed generation ends with: an AI SDK ``error`` chunk for JSON streams."""
    text = "generation interrupted: server shutting down" if isinstance(exc, asyncio.CancelledError) else str(exc)
    text = text or type(exc).__name__
    return {"type": "error", "errorText": text} if is_json else f"\n[error] {text}"


class Generation:
    """A running (or finished) generation writing into the stream at :attr:`path`."""

    def __init__(self, path: str, task: asyncio.Task[str]) -> None:
        self.path = path
        self.task = task
        #: How it ended, once done: ``finished`` (the source ended), ``failed`` (the source
        #: raised, or the storage stayed unavailable past the retry budget), ``stopped`` (another
        #: writer closed the stream or fenced this one off: a stop, or a takeover) or
        #: ``interrupted`` (cancelled, e.g. at shutdown).
        self.outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.task.done()

    async def wait(self) -> str:
        """Wait for the end; returns the stream's final offset. Shielded: cancelling the waiter
        (a client that went away) does not cancel the generation."""
        return await asyncio.shield(self.task)


Outcome = Literal["finished", "failed", "stopped", "interrupted"]


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """How a generation writes its stream."""

    content_type: str = "application/json"
    #: Seconds to gather small chunks into one append, and the most bytes one append gathers.
    linger: float = 0.005
    max_batch_bytes: int = 64 * 1024
    #: What a failed or interrupted generation appends last; None: the default error record.
    error_record: Callable[[BaseException], Any] | None = None
    #: Close the stream at the end (a stream per generation), or leave it open (a session stream
    #: that later turns append to).
    close: bool = True
    #: The producer tuple of the appends: a later writer with a higher epoch fences this one off
    #: (its appends then fail and the generation ends as ``stopped``).
    producer_id: str | None = None
    epoch: int = 0
    first_seq: int = 0
    #: How long to keep retrying an append while the storage is unavailable (a Redis restart or
    #: failover): the same producer tuple each time, so a retry applies exactly once.
    retry_for: float = 30.0


class _Fenced(Exception):
    """Another writer closed the stream or took over the producer: the generation stops."""


async def append_with_retry(storage: Storage, path: str, request: AppendRequest, retry_for: float) -> AppendResult:
    """``storage.append``, retried with backoff while the storage is unavailable (for up to
    ``retry_for`` seconds). Safe only for a request with a producer tuple: a retry of an append
    whose reply was lost is then recognised and not applied twice."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + retry_for
    delay = 0.05
    while True:
        try:
            return await storage.append(path, request)
        except StorageUnavailable:
            if loop.time() + delay > give_up:
                raise
            logger.info("append to %s: storage unavailable, retrying in %.2f s", path, delay)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 2.0)


class GenerationRunner:
    """Owns the background tasks of one :class:`DurableStreams`."""

    def __init__(self, storage: Storage, *, shutdown_timeout: float) -> None:
        self._storage = storage
        # Each running generation by its task (dicts keep insertion order: oldest first).
        self._tasks: dict[asyncio.Task[str], Generation] = {}
        self.shutdown_timeout = shutdown_timeout
        self._stopping: asyncio.Future[None] | None = None

    @property
    def running(self) -> int:
        return sum(not t.done() for t in self._tasks)

    def tasks(self) -> list[asyncio.Task[str]]:
        """The running generations' tasks (each ends with its stream's final offset)."""
        return [t for t in self._tasks if not t.done()]

    async def start(
        self,
        path: str,
        source: AsyncIterable[Any],
        options: WriteOptions,
        *,
        create: StreamConfig | None = None,
        finalize: Callable[[Generation], Awaitable[None]] | None = None,
    ) -> Generation:
        """Write ``source`` into ``path`` from a background task. ``create``: the stream is
        created first, so a client given its URL may read it at once. ``finalize`` runs in the
        same task once the writing ended, whatever the outcome (shielded from cancellation)."""
        if self._stopping is not None:
            # Shutting down: a generation started now would be cut off at once. The client
            # retries, and reaches a server that stays.
            raise StorageUnavailable("the server is shutting down")
        if create is not None:
            await self._storage.create(path, create)
        holder: list[Generation] = []
        task = asyncio.ensure_future(self._run(path, source, options, holder, finalize))
        generation = Generation(path, task)
        holder.append(generation)
        self._tasks[task] = generation
        task.add_done_callback(self._finished)
        metrics.current.generation(1)
        return generation

    def _finished(self, task: asyncio.Task[str]) -> None:
        generation = self._tasks.pop(task, None)
        metrics.current.generation(-1, (generation.outcome if generation else None) or "failed")
        if not task.cancelled() and task.exception() is not None:
            logger.error("generation failed to write its stream", exc_info=task.exception())

    def begin_shutdown(self) -> asyncio.Future[None]:
        """The server is stopping: refuse new generations (``StorageUnavailable``) and start
        :meth:`shutdown` in the background (once); the future ends with it."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown())
        return self._stopping

    async def shutdown(self) -> None:
        """Let running generations finish for ``shutdown_timeout`` seconds, then interrupt them
        (after :meth:`begin_shutdown`: wait for the shutdown it started)."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
        await self._shutdown()

    async def _shutdown(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        # Interrupted, each writes what it received, the reason and the close, shielded (see
        # _write): a second cancel would cut that short, so it comes only after a while.
        await cancel_and_wait(pending, patience=CLEANUP_SECONDS)

    async def _append(self, path: str, request: AppendRequest, retry_for: float) -> None:
        try:
            await append_with_retry(self._storage, path, request, retry_for)
        except (StreamClosed, StaleEpoch) as exc:
            raise _Fenced(path) from exc

    async def _run(
        self,
        path: str,
        source: AsyncIterable[Any],
        options: WriteOptions,
        holder: list[Generation],
        finalize: Callable[[Generation], Awaitable[None]] | None,
    ) -> str:
        try:
            holder[0].outcome, final = await self._write(path, source, options)
        except asyncio.CancelledError:
            holder[0].outcome = "interrupted"
            raise
        finally:
            if holder[0].outcome is None:
                holder[0].outcome = "failed"
            if finalize is not None:
                try:
                    await asyncio.shield(finalize(holder[0]))
                except Exception:
                    logger.exception("generation %s: finalizing failed", path)
        return final

    async def _write(self, path: str, source: AsyncIterable[Any], options: WriteOptions) -> tuple[Outcome, str]:
        storage = self._storage
        content_type = options.content_type
        is_json = is_json_content_type(content_type)
        producer_id = options.producer_id or f"generation-{uuid.uuid4().hex}"
        seq = options.first_seq

        def encode(item: Any) -> bytes:
            if is_json:
                return encode_message(item)
            return item.encode("utf-8") if isinstance(item, str) else bytes(item)

        in_flight: AppendRequest | None = None

        async def write(items: list[bytes], close: bool) -> None:
            nonlocal seq, in_flight
            if not items and not close:
                return
            in_flight = AppendRequest(
                content_type, items, close=close, producer=Producer(producer_id, options.epoch, seq)
            )
            await self._append(path, in_flight, options.retry_for)
            in_flight = None
            seq += 1

        async def tail() -> str:
            return offsets.encode_offset((await storage.head(path)).tail)

        iterator = source.__aiter__()
        # One outstanding __anext__ across batches: cancelling it on a linger timeout would throw
        # into the source generator and break it.
        pending: asyncio.Future[Any] | None = None
        batch: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        flush_at = 0.0
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(iterator.__anext__())
                if batch:
                    wait = flush_at - loop.time()
                    if wait > 0 and size < options.max_batch_bytes:
                        done, _ = await asyncio.wait((pending,), timeout=wait)
                    else:
                        done = set()
                    if not done:
                        await write(batch, close=False)
                        batch, size = [], 0
                        continue
                else:
                    await asyncio.wait((pending,))
                next_future, pending = pending, None
                try:
                    item = next_future.result()
                except StopAsyncIteration:
                    await write(batch, close=options.close)
                    return "finished", await tail()
                encoded = encode(item)
                if not encoded:
                    continue
                if not batch:
                    flush_at = loop.time() + options.linger
                batch.append(encoded)
                size += len(encoded)
        except _Fenced:
            # Stopped from elsewhere (the stream closed, or a higher epoch wrote): what was
            # written stays, nothing more is, and the source is closed below.
            logger.info("generation %s: stopped by another writer", path)
            return "stopped", await tail()
        except BaseException as exc:
            if pending is not None:
                pending.cancel()
            # Whatever was received is kept, then the reason, then the stream is closed: readers
            # always reach an end. Shielded, so that a shutdown's cancellation cannot cut it short.
            if in_flight is not None:
                # Interrupted mid-append: it may or may not have been applied. Sending the same
                # producer request again applies it exactly once either way.
                unsure = in_flight
                fenced = False
                try:
                    await asyncio.shield(self._append(path, unsure, options.retry_for))
                    seq += 1
                except _Fenced:
                    fenced = True
                except Exception as replay_error:
                    logger.warning("generation %s: replaying an interrupted append failed: %r", path, replay_error)
                if unsure.items is batch:
                    batch = []
                if fenced:
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    return "stopped", await tail()
            record = (options.error_record or (lambda e: default_error_record(e, is_json)))(exc)
            final = [*batch, encode(record)] if record is not None else batch
            try:
                await asyncio.shield(write(final, close=options.close))
            except _Fenced:
                pass
            except Exception as final_error:
                logger.warning("generation %s: writing its final record failed: %r", path, final_error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.warning("generation source for %s failed: %r", path, exc)
            try:
                return "failed", await tail()
            except StorageError:
                return "failed", ""
        finally:
            with contextlib.suppress(Exception):
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


def generation_response(
    generation: Generation, stream_url: str, *, mode: Literal["immediate", "await"] = "immediate"
) -> Response:
    """The response that starts a durable generation, as ``createDurableChatTransport`` expects.

    ``immediate``: 201 at once with ``Location`` and ``{"streamUrl"}``. ``await``: 200, headers at
    once (the client may start reading), body ``{"streamUrl", "finalOffset"}`` once the generation
    ends; the generation goes on if the client leaves.
    """
    if mode == "immediate":
        return JSONResponse({"streamUrl": stream_url}, status_code=201, headers={"Location": stream_url})
    if mode != "await":
        raise ValueError("mode must be 'immediate' or 'await'")

    async def body() -> AsyncIterator[bytes]:
        final = await generation.wait()
        yield json.dumps({"streamUrl": stream_url, "finalOffset": final}).encode()

    return StreamingResponse(body(), status_code=200, headers={"Location": stream_url}, media_type="application/json")


def reconnect_response(stream_url: str | None) -> Response:
    """The reconnect endpoint's answer: 204 when no generation is active, else 200 with
    ``Location`` and ``{"streamUrl"}``."""
    if stream_url is None:
        return Response(status_code=204)
    return JSONResponse({"streamUrl": stream_url}, status_code=200, headers={"Location": stream_url})
