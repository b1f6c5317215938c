"""How Redis failures map to the storage's errors: one place for every Redis module."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import StorageUnavailable

UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError, OutOfMemoryError, OSError)
# Server states that pass (memory pressure, failover, a persistence error, a busy script): 503.
UNAVAILABLE_REPLIES = (
    "OOM",
    "MISCONF",
    "BUSY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "LOADING",
    "READONLY",
    "NOREPLICAS",
    "MOVED",
    "ASK",
)


def response_error(exc: ResponseError) -> Exception:
    text = str(exc)
    # Errors raised inside a script read "... script: ... OOM command not allowed ...".
    if any(text.startswith(code) or f" {code} " in text or f"-{code} " in text for code in UNAVAILABLE_REPLIES):
        return StorageUnavailable(text)
    return exc


T = TypeVar("T")


async def mapped(call: Awaitable[T]) -> T:
    """Await a Redis call, its failures turned into the storage's errors."""
    try:
        return await call
    except UNAVAILABLE as exc:
        raise StorageUnavailable(str(exc)) from exc
    except ResponseError as exc:
        raise response_error(exc) from exc
