"""Storage backends behind one interface (:class:`~durable_streams_asgi.storage.base.Storage`)."""

from __future__ import annotations

from .base import Storage
from .memory import MemoryStorage

__all__ = ["MemoryStorage", "Storage"]
