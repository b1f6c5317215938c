"""Records and append observers for memory storage: one process, so dicts are the truth."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

from .base import AppendObserver, Record, RecordConflict

logger = logging.getLogger("durable_streams_asgi.storage")


class AppendObservers:
    """``observe_appends`` for any backend: the observers, and the call made after each write."""

    def __init__(self) -> None:
        # A tuple, so that the hot path's check is one truth test and a call iterates a snapshot.
        self._append_observers: tuple[AppendObserver, ...] = ()

    def observe_appends(self, observer: AppendObserver) -> Callable[[], None]:
        self._append_observers = (*self._append_observers, observer)

        def stop() -> None:
            self._append_observers = tuple(o for o in self._append_observers if o is not observer)

        return stop

    def _observed(self, path: str, start: int, end: int) -> None:
        for observer in self._append_observers:
            try:
                observer(path, start, end)
            except Exception:  # an observer's bug must not fail the write that already happened
                logger.exception("append observer failed for %s", path)


class MemoryRecords(AppendObservers):
    """The record half of :class:`~durable_streams_asgi.storage.memory.MemoryStorage`."""

    def __init__(self) -> None:
        super().__init__()
        self._records: dict[str, dict[str, Record]] = {}
        self._record_versions = itertools.count(1)  # one counter: versions never repeat

    @staticmethod
    def _clock_ms() -> int:
        return int(time.time() * 1000)

    async def get_record(self, space: str, key: str) -> Record | None:
        record = self._records.get(space, {}).get(key)
        return None if record is None else Record(key, record.version, record.value, self._clock_ms())

    async def put_record(self, space: str, key: str, value: bytes, expected_version: int) -> Record:
        records = self._records.setdefault(space, {})
        current = records.get(key)
        if (current.version if current is not None else 0) != expected_version:
            raise RecordConflict(
                key, None if current is None else Record(key, current.version, current.value, self._clock_ms())
            )
        record = Record(key, next(self._record_versions), bytes(value), self._clock_ms())
        records[key] = record
        return record

    async def delete_record(self, space: str, key: str, expected_version: int) -> None:
        records = self._records.get(space, {})
        current = records.get(key)
        if (current.version if current is not None else 0) != expected_version:
            raise RecordConflict(
                key, None if current is None else Record(key, current.version, current.value, self._clock_ms())
            )
        records.pop(key, None)

    async def list_records(self, space: str) -> tuple[int, list[Record]]:
        now = self._clock_ms()
        return now, [Record(r.key, r.version, r.value, now) for r in self._records.get(space, {}).values()]
