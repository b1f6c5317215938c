"""Records on Redis: one hash per space, changed by one compare-and-set script, and stream scans.

``<prefix>{__ds:records:<space>}:r`` holds a space's records (field: key, value:
``<version>:<bytes>``) and ``...:v`` its version counter; both share a hash tag, so a space lives in
one Redis Cluster slot and the script touches one slot. Stream paths start with ``/``, so no
stream's keys can share that tag.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from .base import Record, RecordConflict
from .redis_errors import mapped
from .redis_layout import _escape, _text

if TYPE_CHECKING:
    from .redis_router import Router

_SCRIPT = resources.files(__package__).joinpath("lua").joinpath("record.lua").read_text()
_GLOB_SPECIALS = str.maketrans({c: "\\" + c for c in "*?[]\\"})
_SCAN_COUNT = 1000  # keys one SCAN looks at
_SCANS_PER_PAGE = 20


def _unescape(text: str) -> str:
    return text.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")


def _record(key: str, stored: bytes, now: int) -> Record:
    version, _, value = stored.partition(b":")
    return Record(key, int(version), value, now)


class RedisRecords:
    """The record half of :class:`~durable_streams_asgi.storage.redis.RedisStorage`; it needs only
    a router, a key prefix and the storage's command runner (which maps errors)."""

    def __init__(self, router: Router, prefix: str, command: Callable[..., Awaitable[Any]]) -> None:
        self._script = router.register(_SCRIPT)
        self._router = router
        self._prefix = prefix
        self._command = command

    def _keys(self, space: str) -> list[str]:
        tag = f"{self._prefix}{{__ds:records:{_escape(space)}}}"
        return [f"{tag}:r", f"{tag}:v"]

    async def _run(self, op: str, space: str, key: str = "", expected: int = 0, value: bytes = b"") -> list[Any]:
        return await mapped(self._router.run(self._script, self._keys(space), [op, key, expected, value]))

    async def get_record(self, space: str, key: str) -> Record | None:
        now, stored, _ = await self._run("get", space, key)
        return None if stored is None else _record(key, stored, int(now))

    async def put_record(self, space: str, key: str, value: bytes, expected_version: int) -> Record:
        now, stored, status = await self._run("put", space, key, expected_version, value)
        current = None if stored is None else _record(key, stored, int(now))
        if status == b"conflict":
            # A write whose reply was lost is sent again by the client and then conflicts with
            # itself: the record holding exactly these bytes is the write's own (or an identical one).
            if current is not None and current.value == value and expected_version != current.version:
                return current
            raise RecordConflict(key, current)
        assert current is not None
        return current

    async def delete_record(self, space: str, key: str, expected_version: int) -> None:
        now, stored, status = await self._run("del", space, key, expected_version)
        if status == b"conflict":
            raise RecordConflict(key, None if stored is None else _record(key, stored, int(now)))

    async def list_records(self, space: str) -> tuple[int, list[Record]]:
        now, flat = await self._run("list", space)
        return int(now), [_record(_text(flat[i]), flat[i + 1], int(now)) for i in range(0, len(flat), 2)]

    async def scan_streams(self, prefix: str, cursor: str = "", count: int = 1000) -> tuple[list[str], str]:
        start = len(self._prefix) + 1
        match = f"{self._prefix.translate(_GLOB_SPECIALS)}{{{_escape(prefix).translate(_GLOB_SPECIALS)}*}}:m"
        # A cluster's keys are spread over its masters: the cursor is "<master>#<SCAN cursor>",
        # the masters taken in the order of their names. A scan across a resharding or a failover
        # may repeat or miss what moved meanwhile (as SCAN itself may across a rehash); a master
        # gone from the map is skipped for the next one by name.
        nodes = await self._router.nodes()
        node, _, after = cursor.rpartition("#") if cursor else (nodes[0], "", "0")
        index = bisect.bisect_left(nodes, node)
        if index >= len(nodes) or nodes[index] != node:
            after = "0"  # that master is gone: the next one, from its start
        # SCAN's COUNT is how many keys it looks at, matching or not: in a big keyspace a page
        # takes several short SCANs (each a bounded step for Redis), up to a bound per call.
        paths: list[str] = []
        for _ in range(_SCANS_PER_PAGE):
            if index >= len(nodes):
                break
            reply, keys = await self._command_on(
                nodes[index], "SCAN", after or "0", "MATCH", match, "COUNT", max(count, _SCAN_COUNT)
            )
            paths += [_unescape(_text(key)[start:-3]) for key in keys]
            after = _text(reply) if isinstance(reply, bytes) else str(reply)  # redis-py parses it to an int
            if after == "0":
                index += 1
            if len(paths) >= count:
                break
        return paths, "" if index >= len(nodes) else f"{nodes[index]}#{after}"

    async def _command_on(self, node: str, *args: Any) -> Any:
        return await mapped(self._router.command_on(node, *args))
