"""Durable Streams protocol server as a mountable ASGI application.

from durable_streams_asgi import durable_streams_app
app.mount("/v1/stream", durable_streams_app())
"""

from __future__ import annotations

from .app import Options, durable_streams_app, durable_streams_lifespan
from .storage.base import (
    AppendRequest,
    AppendResult,
    ContentTypeMismatch,
    CreateResult,
    InvalidProducerSeq,
    OffsetOutOfRange,
    Producer,
    ProducerSeqGap,
    ReadResult,
    SequenceConflict,
    StaleEpoch,
    Storage,
    StorageError,
    StorageUnavailable,
    StreamClosed,
    StreamConfig,
    StreamExists,
    StreamGone,
    StreamInfo,
    StreamNotFound,
)
from .storage.memory import MemoryStorage

__version__ = "0.1.0"

__all__ = [
    "AppendRequest",
    "AppendResult",
    "ContentTypeMismatch",
    "CreateResult",
    "InvalidProducerSeq",
    "MemoryStorage",
    "OffsetOutOfRange",
    "Options",
    "Producer",
    "ProducerSeqGap",
    "ReadResult",
    "SequenceConflict",
    "StaleEpoch",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StreamClosed",
    "StreamConfig",
    "StreamExists",
    "StreamGone",
    "StreamInfo",
    "StreamNotFound",
    "durable_streams_app",
    "durable_streams_lifespan",
]
