"""Durable generations: an async iterable (LLM tokens, AI SDK UI message chunks, any producer)
written into a stream by a background task that outlives the HTTP request that started it.

The task batches what arrives within ``linger`` seconds into one append (an LLM emits many tiny
tokens; one write each would cost a round trip each), writes with idempotent producer headers (so
a retried append never duplicates), closes the stream when the source ends, and when the source
fails appends a final error record and closes. On shutdown running generations get
``shutdown_timeout`` seconds to finish, then are interrupted (error record, close).

The response helpers implement the contract of ``@durable-streams/aisdk-transport``: ``immediate``
answers 201 with ``Location`` and ``{"streamUrl"}`` at once; ``await`` sends the headers at once
and the body ``{"streamUrl", "finalOffset"}`` when the generation ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from starlette.responses import JSONResponse, Response, StreamingResponse

from . import offsets
from .jsonmode import encode_message
from .storage.base import AppendRequest, Producer, StreamConfig
from .storage.common import is_json_content_type

if TYPE_CHECKING:
    from .streams import DurableStreams

logger = logging.getLogger("durable_streams_asgi.generation")


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

    @property
    def done(self) -> bool:
        return self.task.done()

    async def wait(self) -> str:
        """Wait for the end; returns the stream's final offset. Shielded: cancelling the waiter
        (a client that went away) does not cancel the generation."""
        return await asyncio.shield(self.task)


class GenerationRunner:
    """Owns the background tasks of one :class:`DurableStreams`."""

    def __init__(self, streams: DurableStreams, *, shutdown_timeout: float) -> None:
        self._streams = streams
        self._tasks: set[asyncio.Task[str]] = set()
        self.shutdown_timeout = shutdown_timeout

    @property
    def running(self) -> int:
        return sum(not t.done() for t in self._tasks)

    async def start(
        self,
        path: str,
        source: AsyncIterable[Any],
        *,
        content_type: str,
        linger: float,
        max_batch_bytes: int,
        error_record: Callable[[BaseException], Any] | None,
        ttl: int | None,
    ) -> Generation:
        # Created before the task starts: a client given the stream's URL may read it at once.
        await self._streams.storage.create(path, StreamConfig(content_type=content_type, ttl_seconds=ttl))
        task = asyncio.ensure_future(self._run(path, source, content_type, linger, max_batch_bytes, error_record))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return Generation(path, task)

    def _finished(self, task: asyncio.Task[str]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("generation failed to write its stream", exc_info=task.exception())

    async def shutdown(self) -> None:
        """Let running generations finish for ``shutdown_timeout`` seconds, then interrupt them."""
        tasks = [t for t in self._tasks if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        while pending:
            # Cancel until they end: on Python 3.11 a cancellation can be lost inside
            # asyncio.wait_for (which connection pools use), so one cancel() is not enough.
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)

    async def _run(
        self,
        path: str,
        source: AsyncIterable[Any],
        content_type: str,
        linger: float,
        max_batch_bytes: int,
        error_record: Callable[[BaseException], Any] | None,
    ) -> str:
        storage = self._streams.storage
        is_json = is_json_content_type(content_type)
        producer_id = f"generation-{uuid.uuid4().hex}"
        seq = 0

        def encode(item: Any) -> bytes:
            if is_json:
                return encode_message(item)
            return item.encode("utf-8") if isinstance(item, str) else bytes(item)

        in_flight: AppendRequest | None = None

        async def write(items: list[bytes], close: bool) -> str:
            nonlocal seq, in_flight
            in_flight = AppendRequest(content_type, items, close=close, producer=Producer(producer_id, 0, seq))
            result = await storage.append(path, in_flight)
            in_flight = None
            seq += 1
            return offsets.encode_offset(result.info.tail)

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
                    if wait > 0 and size < max_batch_bytes:
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
                    return await write(batch, close=True)
                encoded = encode(item)
                if not encoded:
                    continue
                if not batch:
                    flush_at = loop.time() + linger
                batch.append(encoded)
                size += len(encoded)
        except BaseException as exc:
            if pending is not None:
                pending.cancel()
            # Whatever was received is kept, then the reason, then the stream is closed: readers
            # always reach an end. Shielded, so that a shutdown's cancellation cannot cut it short.
            if in_flight is not None:
                # Interrupted mid-append: it may or may not have been applied. Sending the same
                # producer request again applies it exactly once either way.
                unsure = in_flight
                try:
                    await asyncio.shield(storage.append(path, unsure))
                    seq += 1
                except Exception as replay_error:
                    logger.warning("generation %s: replaying an interrupted append failed: %r", path, replay_error)
                if unsure.items is batch:
                    batch = []
            record = (error_record or (lambda e: default_error_record(e, is_json)))(exc)
            final = [*batch, encode(record)] if record is not None else batch
            try:
                await asyncio.shield(write(final, close=True))
            except Exception as final_error:
                logger.warning("generation %s: writing its final record failed: %r", path, final_error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.warning("generation source for %s failed: %r", path, exc)
            return offsets.encode_offset((await storage.head(path)).tail)
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
