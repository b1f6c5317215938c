"""Streams configured from the environment, for host apps that tests start in a subprocess.

The variables are those the conformance fixture (tests/test_conformance.py, ``serve_example``)
sets: ``REDIS_URL`` (memory storage when unset), ``DURABLE_STREAMS_KEY_PREFIX``,
``DURABLE_STREAMS_LONG_POLL_TIMEOUT``; and ``DURABLE_STREAMS_CLIENT_NAME``, the Redis client
name of every connection (so a test can list them with CLIENT LIST).

When the storage is closed, :data:`CLOSED_MARKER` is printed to stderr, so that a test can tell
from the server's log that shutdown closed it (the process exiting would close its sockets anyway).
"""

from __future__ import annotations

import os
import sys

from durable_streams_asgi import DurableStreams
from durable_streams_asgi.storage.base import Storage

CLOSED_MARKER = "durable streams storage closed"


def streams_from_env() -> DurableStreams:
    storage: Storage | None = None
    if os.environ.get("REDIS_URL"):
        from durable_streams_asgi.storage.redis import RedisStorage

        storage = RedisStorage.from_url(
            os.environ["REDIS_URL"],
            key_prefix=os.environ.get("DURABLE_STREAMS_KEY_PREFIX", "ds:"),
            client_name=os.environ.get("DURABLE_STREAMS_CLIENT_NAME"),
        )
    long_poll_timeout = float(os.environ.get("DURABLE_STREAMS_LONG_POLL_TIMEOUT", "30"))
    loopback = os.environ.get("DURABLE_STREAMS_ALLOW_LOOPBACK_WEBHOOKS") == "1"
    streams = DurableStreams(storage, long_poll_timeout=long_poll_timeout, allow_loopback_webhooks=loopback)
    aclose = streams.storage.aclose

    async def reported_aclose() -> None:
        await aclose()
        print(CLOSED_MARKER, file=sys.stderr, flush=True)

    streams.storage.aclose = reported_aclose  # type: ignore[method-assign]
    return streams
