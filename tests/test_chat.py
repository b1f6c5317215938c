"""The chat transports' server side (durable_streams_asgi.chat), in process, over every backend.

Two ``DurableStreams`` over one backend stand for two worker processes: on Redis each has its own
connections, notifier and chat runtime, as separate processes would. (The same flows with the
real npm clients, real processes, SIGKILL and a Redis restart are in test_chat_interop.py.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from durable_streams_asgi import DurableStreams, StorageUnavailable
from durable_streams_asgi.chat import (
    AISDKChat,
    ChatTurn,
    TanStackChat,
    TanStackTurn,
    tanstack_chunks,
    ui_message_chunks,
)
from durable_streams_asgi.generation import WriteOptions
from durable_streams_asgi.storage.base import AppendRequest, AppendResult, Storage, StreamConfig

from .conftest import StorageFactory

WORDS = [f"w{i} " for i in range(12)]


class Gate:
    """A model whose tokens come out when the test lets them: no timing guesses."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.allowed = asyncio.Semaphore(0)
        self.closed = asyncio.Event()
        self.started = asyncio.Event()

    def release(self, count: int | None = None) -> None:
        for _ in range(len(self.words) + 1 if count is None else count):
            self.allowed.release()

    async def tokens(self) -> AsyncIterator[str]:
        self.started.set()
        try:
            for word in self.words:
                await self.allowed.acquire()
                yield word
        finally:
            self.closed.set()


def user(text: str, message_id: str) -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


async def free_model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
    async def tokens() -> AsyncIterator[str]:
        for word in [f"re: {turn.prompt} ", *WORDS]:
            yield word

    async for chunk in ui_message_chunks(tokens()):
        yield chunk


class Worker:
    """One 'process': streams, the chat apps and an HTTP client into them."""

    def __init__(self, storage: Storage, model: Callable[[ChatTurn], Any], tanstack_model: Any = None,
                 lease_ttl: float = 15.0) -> None:  # fmt: skip
        self.streams = DurableStreams(storage, shutdown_timeout=0.5)
        self.chat = AISDKChat(self.streams, model, lease_ttl=lease_ttl, max_body_size=64 * 1024)
        self.tanstack = TanStackChat(self.streams, tanstack_model or tanstack_free, lease_ttl=lease_ttl)
        app = Starlette(
            routes=[
                *self.chat.routes("/api/chat"),
                *self.tanstack.routes("/api/ts"),
                Mount("/v1/stream", self.streams.app),
            ]
        )
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.streams.generations.shutdown()
        await self.chat.runtime.aclose()

    async def send(self, chat_id: str, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
        body = {"id": chat_id, "messages": messages, "trigger": "submit-message", "messageId": None, **extra}
        return await self.http.post("/api/chat", json=body)

    async def chunks(self, url: str) -> list[dict[str, Any]]:
        """Everything the stream holds, read live to its end."""
        path = url.split("/v1/stream", 1)[1]
        out: list[dict[str, Any]] = []
        async for chunk in self.streams.read(path, live=True, timeout=10):
            out.extend(chunk.messages)
        return out


async def tanstack_free(turn: TanStackTurn) -> AsyncIterator[dict[str, Any]]:
    async def tokens() -> AsyncIterator[str]:
        for word in [f"re: {turn.prompt} ", *WORDS]:
            yield word

    async for chunk in tanstack_chunks(tokens(), turn):
        yield chunk


@pytest.fixture
async def workers(storage_factory: StorageFactory) -> AsyncIterator[Callable[..., Any]]:
    made: list[Worker] = []
    memory: list[Storage] = []

    async def make(model: Any = free_model, **kw: Any) -> Worker:
        storage = await storage_factory()
        if type(storage).__name__ == "MemoryStorage":
            # Memory storage is one process's: the "processes" share the one instance.
            memory.append(storage) if not memory else None
            storage = memory[0]
        worker = Worker(storage, model, **kw)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        await worker.aclose()


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["delta"] for c in chunks if c.get("type") == "text-delta")


async def test_send_answers_as_the_aisdk_transport_expects(workers: Callable[..., Any]) -> None:
    worker = await workers()
    response = await worker.send("c1", [user("hello", "u1")])
    assert response.status_code == 201
    url = response.json()["streamUrl"]
    assert response.headers["location"] == url and url.startswith("http://t/v1/stream/chats/c1/")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["access-control-expose-headers"] == "Location"
    chunks = await worker.chunks(url)
    assert [c["type"] for c in chunks][:2] == ["start", "text-start"]
    assert chunks[0]["messageId"].startswith("msg-")
    assert [c["type"] for c in chunks][-2:] == ["text-end", "finish"]
    assert text_of(chunks) == "re: hello " + "".join(WORDS)
    assert (await worker.streams.head(url.split("/v1/stream")[1])).closed


async def test_any_worker_reconnects_and_a_reload_gets_the_conversation(workers: Callable[..., Any]) -> None:
    gate = Gate(WORDS)

    async def model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
        async for chunk in ui_message_chunks(gate.tokens()):
            yield chunk

    one, two = await workers(model), await workers(model)
    assert (await two.http.get("/api/chat/c2/stream")).status_code == 204
    url = (await one.send("c2", [user("first", "u1")])).json()["streamUrl"]
    reconnect = await two.http.get("/api/chat/c2/stream")
    assert reconnect.status_code == 200 and reconnect.headers["location"] == url == reconnect.json()["streamUrl"]
    state = (await two.http.get("/api/chat/c2/messages")).json()
    assert {k: state[k] for k in ("messages", "active")} == {"messages": [user("first", "u1")], "active": url}
    assert state["history"] == "http://t/v1/stream/chats/c2/history"
    # Following the history from the offset given: the next record is this answer's.
    follow = asyncio.ensure_future(
        two.http.get(state["history"], params={"offset": state["offset"], "live": "long-poll"})
    )
    assert (await two.send("c2", [user("first", "u1")])).status_code == 409  # one answer at a time
    gate.release()
    chunks = await two.chunks(url)
    await one.streams.generations.shutdown()  # let the finished generation record its answer
    assert (await follow).json()[0]["answer"] == url.split("/v1/stream")[1]
    assert (await two.http.get("/api/chat/c2/stream")).status_code == 204
    state = (await two.http.get("/api/chat/c2/messages")).json()
    assert state["active"] is None
    answer = state["messages"][1]
    assert answer["role"] == "assistant" and answer["id"] == chunks[0]["messageId"]
    assert answer["parts"] == [{"type": "text", "text": "".join(WORDS), "state": "done"}]

    # A second turn through the other worker, then a regenerate of it: the history keeps what
    # the client kept, plus the new answer, each once.
    gate.words = ["second "]
    gate.release()
    url2 = (await two.send("c2", [*state["messages"], user("again", "u2")])).json()["streamUrl"]
    await two.chunks(url2)
    await two.streams.generations.shutdown()
    after = (await one.http.get("/api/chat/c2/messages")).json()["messages"]
    assert [m["role"] for m in after] == ["user", "assistant", "user", "assistant"]
    gate.words = ["regenerated "]
    gate.release()
    body = {"id": "c2", "messages": after[:3], "trigger": "regenerate-message", "messageId": after[3]["id"]}
    url3 = (await one.http.post("/api/chat", json=body)).json()["streamUrl"]
    await one.chunks(url3)
    await one.streams.generations.shutdown()
    final = (await two.http.get("/api/chat/c2/messages")).json()["messages"]
    assert [m["id"] for m in final[:3]] == [m["id"] for m in after[:3]]
    assert len(final) == 4 and final[3]["parts"][0]["text"] == "regenerated "


async def test_a_stop_sent_to_any_worker_ends_the_answer(workers: Callable[..., Any]) -> None:
    gate = Gate(WORDS)

    async def model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
        async for chunk in ui_message_chunks(gate.tokens()):
            yield chunk

    one, two = await workers(model), await workers(model)
    url = (await one.send("c3", [user("stop me", "u1")])).json()["streamUrl"]
    gate.release(3)
    path = url.split("/v1/stream")[1]
    seen = 0
    async for chunk in one.streams.read(path, live=True, timeout=5):
        seen += sum(m.get("type") == "text-delta" for m in chunk.messages)
        if seen >= 3:
            break
    assert (await two.http.post("/api/chat/c3/stop")).status_code == 204
    chunks = await one.chunks(url)
    assert chunks[-1] == {"type": "abort"}
    assert text_of(chunks) == "".join(WORDS[:3])
    gate.release()  # the model's next token meets the closed stream: it is stopped there
    await asyncio.wait_for(gate.closed.wait(), 5)
    await one.streams.generations.shutdown()
    assert text_of(await one.chunks(url)) == "".join(WORDS[:3])  # nothing written after the stop
    state = (await one.http.get("/api/chat/c3/messages")).json()
    assert state["active"] is None
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
    assert state["messages"][1]["parts"][0]["text"] == "".join(WORDS[:3])
    # The chat is free again; stopping a chat with nothing running is a no-op.
    assert (await two.http.post("/api/chat/c3/stop")).status_code == 204
    gate.words, gate.closed = ["ok "], asyncio.Event()
    gate.release()
    assert (await two.send("c3", state["messages"] + [user("next", "u2")])).status_code == 201


async def test_an_orphaned_answer_is_ended_by_another_worker(workers: Callable[..., Any]) -> None:
    """The worker running an answer stops renewing its lease (it died): another ends the answer
    with an error chunk and a close within the lease bound, and the chat is free again."""
    gate = Gate(WORDS)

    async def model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
        async for chunk in ui_message_chunks(gate.tokens()):
            yield chunk

    ttl = 0.4
    dying = await workers(model, lease_ttl=ttl)
    url = (await dying.send("c4", [user("orphan", "u1")])).json()["streamUrl"]
    gate.release(2)
    await dying.chat.runtime.aclose()  # no more renewals: as good as dead for the others
    survivor = await workers(model, lease_ttl=ttl)
    survivor.chat.runtime.start()
    started = time.monotonic()
    chunks = await survivor.chunks(url)
    elapsed = time.monotonic() - started
    assert chunks[-1] == {"type": "error", "errorText": "the server writing this answer stopped"}
    assert elapsed < 3 * ttl + 1.0, elapsed
    await asyncio.wait_for(survivor.chat.runtime.next_pass(), 5)  # the pass that took it over ended
    assert (await survivor.http.get("/api/chat/c4/stream")).status_code == 204
    history = (await survivor.http.get("/api/chat/c4/messages")).json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    # The old writer, should it wake up, is fenced off: its appends are refused, nothing is added.
    gate.release()
    await asyncio.wait_for(gate.closed.wait(), 5)
    assert await survivor.chunks(url) == chunks


class LosingReplies:
    """Real storage whose appends fail as a Redis blip would: some after being applied (the reply
    was lost), some before. Everything else goes straight through."""

    def __init__(self, storage: Storage, plan: dict[int, str]) -> None:
        self._storage = storage
        self._plan = plan
        self.appends = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    async def append(self, path: str, request: AppendRequest) -> AppendResult:
        self.appends += 1
        fault = self._plan.get(self.appends)
        if fault == "before":
            raise StorageUnavailable("injected: connection refused")
        result = await self._storage.append(path, request)
        if fault == "after":
            raise StorageUnavailable("injected: reply lost")
        return result


async def test_appends_that_fail_transiently_are_retried_exactly_once(storage: Storage) -> None:
    flaky = LosingReplies(storage, {2: "after", 3: "before", 4: "after", 5: "before", 6: "before"})
    streams = DurableStreams(flaky, shutdown_timeout=1)  # type: ignore[arg-type]
    words = [f"x{i} " for i in range(6)]

    async def model(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
        async def tokens() -> AsyncIterator[str]:
            for word in words:
                await asyncio.sleep(0.01)  # one append per token: each can fail
                yield word

        async for chunk in ui_message_chunks(tokens()):
            yield chunk

    chat = AISDKChat(streams, model)
    try:
        generation, path = await chat.start("c5", [user("flaky", "u1")])
        await generation.wait()
        chunks = [m async for c in streams.read(path) for m in c.messages]
        assert generation.outcome == "finished"
        assert text_of(chunks) == "".join(words)
        assert [c["type"] for c in chunks].count("finish") == 1
        assert not any(c["type"] == "error" for c in chunks)
        assert flaky.appends > 8  # the faults happened
    finally:
        await streams.generations.shutdown()
        await chat.runtime.aclose()


async def test_a_failing_model_ends_with_an_error_chunk_and_frees_the_chat(workers: Callable[..., Any]) -> None:
    async def broken(turn: ChatTurn) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "text-start", "id": "t"}
        yield {"type": "text-delta", "id": "t", "delta": "partial"}
        raise RuntimeError("model exploded")

    worker = await workers(broken)
    url = (await worker.send("c6", [user("boom", "u1")])).json()["streamUrl"]
    chunks = await worker.chunks(url)
    assert chunks[0]["type"] == "start"  # prepended, with the answer's message id
    assert chunks[-1] == {"type": "error", "errorText": "model exploded"}
    await worker.streams.generations.shutdown()
    assert (await worker.http.get("/api/chat/c6/stream")).status_code == 204


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"content-type": "text/plain"}, b"{}", 415),
        ({"content-type": "application/json"}, b"{not json", 400),
        ({"content-type": "application/json"}, b"[]", 400),
        ({"content-type": "application/json"}, b'{"id": "a/b", "messages": []}', 400),
        ({"content-type": "application/json"}, b'{"id": "ok", "messages": "hi"}', 400),
        ({"content-type": "application/json"}, b'{"id": "ok", "messages": [1]}', 400),
        ({"content-type": "application/json"}, b'{"id": "ok", "messages": [], "trigger": "x"}', 400),
        ({"content-type": "application/json"}, b'{"id": "ok", "messages": [{"parts": 3}]}', 400),
        ({"content-type": "application/json"}, b'{"id": "ok", "pad": "' + b"x" * 70_000 + b'"}', 413),
    ],
)
async def test_bad_requests_get_a_clear_4xx_and_change_nothing(
    workers: Callable[..., Any], headers: dict[str, str], body: bytes, status: int
) -> None:
    worker = await workers()
    response = await worker.http.post("/api/chat", content=body, headers=headers)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and "Traceback" not in response.text
    state = (await worker.http.get("/api/chat/ok/messages")).json()
    assert (state["messages"], state["active"]) == ([], None)
    assert (await worker.http.get("/api/chat/not%20ok/stream")).status_code == 400
    assert (await worker.http.post("/api/ts/ok", content=body, headers=headers)).status_code in (status, 400)


# -- TanStack AI ------------------------------------------------------------------------------


def ts_user(text: str, message_id: str) -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "content": text}]}


async def session(worker: Worker, chat_id: str) -> list[dict[str, Any]]:
    return [m async for c in worker.streams.read(f"/sessions/{chat_id}") for m in c.messages]


async def test_tanstack_session_holds_the_conversation(workers: Callable[..., Any]) -> None:
    one, two = await workers(), await workers()
    response = await one.http.post("/api/ts/s1", json={"messages": [ts_user("hi", "u1")], "data": None})
    assert response.status_code == 202 and response.headers["cache-control"] == "no-store"
    await one.streams.generations.shutdown()
    chunks = await session(two, "s1")
    assert [c["type"] for c in chunks[:3]] == ["TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END"]
    assert chunks[0]["role"] == "user" and chunks[1]["delta"] == "hi"
    assert chunks[3]["type"] == "RUN_STARTED" and chunks[-1]["type"] == "RUN_FINISHED"
    snapshot = (await two.http.get("/api/ts/s1/snapshot")).json()
    assert [(m["role"], m["parts"][0]["content"]) for m in snapshot["messages"]] == [
        ("user", "hi"),
        ("assistant", "re: hi " + "".join(WORDS)),
    ]
    # The read route is the session stream over the protocol, offsets and all.
    read = await two.http.get("/api/ts/s1/stream", params={"offset": "-1"})
    assert read.status_code == 200 and read.json() == chunks
    assert read.headers["stream-next-offset"] == snapshot["offset"]
    tail = await two.http.get("/api/ts/s1/stream", params={"offset": snapshot["offset"]})
    assert tail.json() == [] and tail.headers["stream-up-to-date"] == "true"

    # A reload re-sends the same message to regenerate: it is not echoed twice.
    history = [*snapshot["messages"]]
    assert (await two.http.post("/api/ts/s1", json={"messages": [history[0]]})).status_code == 202
    await two.streams.generations.shutdown()
    again = (await one.http.get("/api/ts/s1/snapshot")).json()["messages"]
    assert [m["role"] for m in again] == ["user", "assistant", "assistant"]
    assert (await one.http.post("/api/ts/s1", json={"messages": [*again, ts_user("more", "u2")]})).status_code == 202
    await one.streams.generations.shutdown()
    final = (await two.http.get("/api/ts/s1/snapshot")).json()["messages"]
    assert [m["role"] for m in final] == ["user", "assistant", "assistant", "user", "assistant"]
    assert final[3]["parts"][0]["content"] == "more"


async def test_tanstack_stop_and_orphan_end_the_run(workers: Callable[..., Any]) -> None:
    gate = Gate(WORDS)

    async def model(turn: TanStackTurn) -> AsyncIterator[dict[str, Any]]:
        async for chunk in tanstack_chunks(gate.tokens(), turn):
            yield chunk

    ttl = 0.4
    one = await workers(tanstack_model=model, lease_ttl=ttl)
    two = await workers(tanstack_model=model, lease_ttl=ttl)
    assert (await one.http.post("/api/ts/s2", json={"messages": [ts_user("a", "u1")]})).status_code == 202
    assert (await two.http.post("/api/ts/s2", json={"messages": [ts_user("a", "u1")]})).status_code == 409
    gate.release(2)
    await asyncio.wait_for(gate.started.wait(), 5)
    assert (await two.http.post("/api/ts/s2/stop")).status_code == 204
    chunks = await session(one, "s2")
    assert chunks[-1]["type"] == "RUN_ERROR" and chunks[-1]["code"] == "aborted"
    assert chunks[-2]["type"] == "TEXT_MESSAGE_END"
    gate.release()
    await asyncio.wait_for(gate.closed.wait(), 5)
    await one.streams.generations.shutdown()
    assert await session(one, "s2") == chunks  # the old run wrote nothing after the stop

    # A run whose worker stops renewing is ended by the other with code "orphaned".
    gate.closed, gate.started = asyncio.Event(), asyncio.Event()
    gate.allowed = asyncio.Semaphore(0)
    assert (await one.http.post("/api/ts/s2", json={"messages": [ts_user("b", "u2")]})).status_code == 202
    await one.chat.runtime.aclose()
    two.chat.runtime.start()
    path = "/sessions/s2"
    offset = (await two.streams.head(path)).tail
    deadline = time.monotonic() + 3 * ttl + 1.0
    while True:
        last = (await session(two, "s2"))[-1]
        if last["type"] == "RUN_ERROR" and last["code"] == "orphaned":
            break
        assert time.monotonic() < deadline, "the orphaned run was not ended in time"
        await two.streams.storage.wait_for_data(path, offset, deadline - time.monotonic())
        offset = (await two.streams.head(path)).tail
    assert json.loads(json.dumps(last))["error"]["code"] == "orphaned"


async def test_a_generation_whose_storage_stays_down_ends_as_failed(storage: Storage) -> None:
    """Past its retry budget a generation gives up: it ends as 'failed' (the replay of its last
    append and its final record fail too), and its task returns rather than raise."""
    down = LosingReplies(storage, {n: "before" for n in range(1, 10_000)})
    streams = DurableStreams(down, shutdown_timeout=1)  # type: ignore[arg-type]
    await storage.create("/down", StreamConfig(content_type="application/json"))

    async def source() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "text-delta", "delta": "x"}

    generation = await streams.start_generation(
        "/down", source(), create=False, options=WriteOptions(retry_for=0.05, close=False)
    )
    assert (await generation.task).startswith("0000")  # the stream's offset: nothing was written
    assert generation.outcome == "failed"
    assert (await storage.head("/down")).tail == 0
