"""Memory storage's own limits: a development server open to anyone cannot be filled until the
process dies, and its stream ids (in ETags served as public) never repeat across restarts."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from durable_streams_asgi import MemoryStorage, StorageFull
from durable_streams_asgi.storage.base import AppendRequest, StreamConfig

from .conftest import make_host_app

TEXT = StreamConfig(content_type="text/plain")


async def test_bytes_and_streams_are_bounded_and_a_refused_write_changes_nothing() -> None:
    storage = MemoryStorage(max_bytes=10, max_streams=2)
    await storage.create("/a", TEXT, [b"12345"])
    await storage.append("/a", AppendRequest("text/plain", [b"678"], seq="1"))
    with pytest.raises(StorageFull):
        await storage.append("/a", AppendRequest("text/plain", [b"abc"], seq="2", close=True))
    info = await storage.head("/a")
    assert (info.tail, info.closed) == (8, False)
    # The refused request's Stream-Seq was not taken either: the same one is accepted later.
    await storage.append("/a", AppendRequest("text/plain", [b"90"], seq="2"))
    assert storage.bytes == 10
    await storage.create("/b", TEXT)
    with pytest.raises(StorageFull):
        await storage.create("/c", TEXT)
    with pytest.raises(StorageFull):
        await storage.create("/b2", TEXT, [b"x"])
    await storage.delete("/a")  # deleting frees its bytes, and a stream's place
    assert storage.bytes == 0
    await storage.create("/c", TEXT, [b"0123456789"])
    assert b"".join((await storage.read("/c", 0, 100)).items) == b"0123456789"


async def test_a_full_storage_answers_507_with_a_short_message() -> None:
    app = make_host_app(MemoryStorage(max_bytes=4))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1/stream") as c:
        assert (await c.put("/s", headers={"Content-Type": "text/plain"}, content=b"1234")).status_code == 201
        r = await c.post("/s", headers={"Content-Type": "text/plain"}, content=b"5")
        assert r.status_code == 507 and r.text == "storage full: nothing was written"
        assert (await c.get("/s", params={"offset": "-1"})).content == b"1234"


def test_stream_ids_differ_across_restarts() -> None:
    """The first stream of two runs of the process: same path, same content, other ETag."""
    code = (
        "import asyncio\n"
        "from durable_streams_asgi import MemoryStorage\n"
        "from durable_streams_asgi.storage.base import StreamConfig\n"
        "async def main():\n"
        "    print((await MemoryStorage().create('/s', StreamConfig('text/plain'))).info.stream_id)\n"
        "asyncio.run(main())\n"
    )
    ids = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in "ab"
    }
    assert len(ids) == 2
