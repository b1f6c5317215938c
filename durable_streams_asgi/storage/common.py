"""Rules shared by every backend, so that they cannot drift apart."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import replace
from typing import Any

from .base import ContentTypeMismatch, InvalidForkSubOffset, OffsetOutOfRange, Storage, StreamConfig, Watch

DEFAULT_CONTENT_TYPE = "application/octet-stream"


async def wait_resolved(shared: asyncio.Future[Any], timeout: float) -> bool:
    """Wait until ``shared`` is resolved (True) or ``timeout`` seconds pass (False), without ever
    cancelling it: many waiters share one future per stream.

    A waiter future of its own and a timer: leaner than ``asyncio.wait``, which matters when one
    append wakes thousands of readers, and (with partials rather than closures) small, which
    matters when thousands of idle readers wait.
    """
    if shared.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()
    woken = functools.partial(_woken, waiter)
    shared.add_done_callback(woken)
    timer = loop.call_later(timeout, _settle, waiter, False)
    try:
        return await waiter
    finally:
        timer.cancel()
        shared.remove_done_callback(woken)


async def wait_for_data(storage: Storage, path: str, position: int, timeout: float) -> bool:
    """:meth:`Storage.wait_for_data` in terms of :meth:`Storage.watch` (Redis storage uses it)."""
    watch = await storage.watch(path, position)
    try:
        return await wait_resolved(watch.future, timeout)
    finally:
        watch.close()


def resolved_watch() -> Watch:
    """A watch whose future is already resolved: there is something to read now."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return Watch(future)


def _settle(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _woken(waiter: asyncio.Future[bool], _shared: object) -> None:
    _settle(waiter, True)


@functools.lru_cache(maxsize=1024)
def media_type(content_type: str | None) -> str:
    """``Text/Plain; charset=utf-8`` -> ``text/plain``: parameters and case do not matter."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json_content_type(content_type: str | None) -> bool:
    return media_type(content_type) == "application/json"


def same_content_type(a: str | None, b: str | None) -> bool:
    return media_type(a) == media_type(b)


def config_matches(requested: StreamConfig, resolved: StreamConfig, closed: bool, again: StreamConfig) -> bool:
    """Whether a PUT to an existing stream repeats its creation (200) or conflicts (409).

    ``requested`` is what the creating PUT asked for and ``resolved`` what the stream got (for a
    fork, with inherited content type and expiry). A repeated fork that leaves out the content type
    asks to inherit it, which is what the fork has (a mismatch was refused at creation).
    """
    content_type_ok = again.content_type is None or same_content_type(resolved.content_type, again.content_type)
    return (
        content_type_ok
        and requested.ttl_seconds == again.ttl_seconds
        and requested.expires_at == again.expires_at
        and closed == again.closed
        and requested.fork_from == again.fork_from
        and (again.fork_offset is None or resolved.fork_offset == again.fork_offset)
        and requested.fork_sub_offset == again.fork_sub_offset
    )


def resolve_fork(config: StreamConfig, source: StreamConfig, source_tail: int) -> tuple[int, StreamConfig]:
    """Validate a fork request against its source: the fork point and the fork's own config.

    Raises :class:`OffsetOutOfRange`, :class:`InvalidForkSubOffset` or
    :class:`ContentTypeMismatch`. Expiry follows PROTOCOL.md section 4.2: a fork that asks for none
    inherits the source's TTL or absolute expiry.
    """
    anchor = source_tail if config.fork_offset is None else config.fork_offset
    if anchor > source_tail:
        raise OffsetOutOfRange(anchor)
    point = anchor + config.fork_sub_offset
    if point > source_tail:
        raise InvalidForkSubOffset(config.fork_sub_offset)
    if config.content_type is not None and not same_content_type(config.content_type, source.content_type):
        raise ContentTypeMismatch(config.content_type)
    ttl, expires_at = config.ttl_seconds, config.expires_at
    if ttl is None and expires_at is None:
        ttl, expires_at = source.ttl_seconds, source.expires_at
    return point, replace(
        config,
        content_type=source.content_type if config.content_type is None else config.content_type,
        ttl_seconds=ttl,
        expires_at=expires_at,
        fork_offset=anchor,
    )
