"""Durable Streams protocol server as a mountable ASGI application.

from durable_streams_asgi import durable_streams_app
app.mount("/v1/stream", durable_streams_app())
"""

from __future__ import annotations

from .app import AccessDenied, Authorize, Options, durable_streams_app, durable_streams_lifespan
from .auth import JWTAuth, TokenAuth, any_of
from .generation import Generation, generation_response, reconnect_response
from .middleware import DurableStreamsMiddleware, streams_mount
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
    StorageFull,
    StorageUnavailable,
    StreamClosed,
    StreamConfig,
    StreamExists,
    StreamGone,
    StreamInfo,
    StreamNotFound,
)
from .storage.memory import MemoryStorage
from .streams import Chunk, DurableStreams
from .tuning import tune_gc

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AppendRequest",
    "AppendResult",
    "Authorize",
    "Chunk",
    "ContentTypeMismatch",
    "CreateResult",
    "DurableStreams",
    "DurableStreamsMiddleware",
    "Generation",
    "InvalidProducerSeq",
    "JWTAuth",
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
    "StorageFull",
    "StorageUnavailable",
    "StreamClosed",
    "StreamConfig",
    "StreamExists",
    "StreamGone",
    "StreamInfo",
    "StreamNotFound",
    "TokenAuth",
    "any_of",
    "durable_streams_app",
    "durable_streams_lifespan",
    "generation_response",
    "reconnect_response",
    "streams_mount",
    "tune_gc",
]
