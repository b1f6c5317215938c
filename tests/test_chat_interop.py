"""The example's chat endpoints driven by the real client packages, from Node (tests/interop/).

`@durable-streams/aisdk-transport` (what useChat of the AI SDK runs on) and
`@durable-streams/tanstack-ai-transport` (TanStack AI's connection) talk to `uvicorn main:app` of
examples/fastapi_app: with memory storage in one process, and on Redis in two processes behind
tests/roundrobin.py, so consecutive requests of one client land on different processes. A page
refresh in the middle of an answer must end with the whole answer, exactly once.

Then the faults: the process that owns a generation is SIGKILLed (another process must end it with
an error and close it within a few lease TTLs), and Redis itself is SIGKILLed and restarted in the
middle of an answer (the answer must still be complete, every token once).

Each Node script takes one JSON object and prints JSON lines: events as things happen, then the
result (see tests/interop/lib.mjs).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import RedisServer, example_answer, free_port, spawn, spawn_proxy, stop, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fastapi_app"
INTEROP = ROOT / "tests" / "interop"
TOKENS = 40  # the fake model's t0 ... t39 after its sentence: about 2.5 s of answer at 0.05 s a token
LEASE_TTL = 2  # CHAT_LEASE_TTL of the fault tests, seconds


# -- Node and the scripts ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with tests/interop's locked packages installed (npm ci, when node_modules
    is missing or older than the lock file)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js and npm are required for the chat interop tests: see README, Prerequisites")
    lock = INTEROP / "package-lock.json"
    installed = INTEROP / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=INTEROP, check=True)
    return node


class NodeScript:
    """One run of a script of tests/interop: its JSON lines read as they come, with the time each
    arrived (time.monotonic()), so a test can wait for an event and measure when it happened."""

    def __init__(self, node: str, script: str, payload: dict[str, Any], stderr: Path) -> None:
        self.script = script
        self.stderr = stderr
        self.seen: list[dict[str, Any]] = []
        self._lines: queue.Queue[tuple[float, dict[str, Any]] | None] = queue.Queue()
        self.process = subprocess.Popen(
            [node, f"{script}.mjs", json.dumps(payload)],
            cwd=INTEROP,
            stdout=subprocess.PIPE,
            stderr=stderr.open("wb"),
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            arrived = time.monotonic()
            try:
                item = json.loads(line)
            except ValueError:
                item = {"unparsed": line}
            self._lines.put((arrived, item))
        self._lines.put(None)

    def _fail(self, why: str) -> None:
        self.kill()
        seen = json.dumps(self.seen, indent=1)[-12000:]
        pytest.fail(f"{self.script}: {why}\nstdout:\n{seen}\nstderr:\n{self.stderr.read_text()[-3000:]}")

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str = "event") -> float:
        """Waits for a line that satisfies ``predicate``; returns when it arrived (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._fail(f"no {what} within {timeout} s")
                raise AssertionError from None
            if line is None:
                self._lines.put(None)  # for the next waiter
                self._fail(f"ended before {what}")
            arrived, item = line  # type: ignore[misc]
            self.seen.append(item)
            if predicate(item):
                return arrived

    def event(self, name: str, timeout: float, **fields: Any) -> float:
        return self.wait_for(
            lambda item: item.get("event") == name and all(item.get(k) == v for k, v in fields.items()),
            timeout,
            f"{name} {fields or ''}",
        )

    def result(self, timeout: float) -> dict[str, Any]:
        """Waits for the script to end; its result, or a failure with everything it printed."""
        self.wait_for(lambda item: "result" in item or "error" in item, timeout, "result")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._fail("printed its result but did not exit")
        last = self.seen[-1]
        if "error" in last or self.process.returncode != 0:
            self._fail(f"failed (exit {self.process.returncode})")
        return last["result"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def run_node(node: str, tmp_path: Path) -> Iterator[Callable[..., NodeScript]]:
    """Starts a script of tests/interop with a JSON payload; what is still running at the end of
    the test is killed."""
    started: list[NodeScript] = []

    def start(script: str, payload: dict[str, Any]) -> NodeScript:
        run = NodeScript(node, script, payload, tmp_path / f"{script}-{len(started)}.stderr")
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()


# -- the example's fake model -----------------------------------------------------------------------


@functools.lru_cache
def expected_answer(prompt: str, tokens: int = TOKENS) -> str:
    return example_answer(prompt, tokens)


# -- the servers ------------------------------------------------------------------------------------


def example_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DEMO_TOKENS": str(TOKENS),
        "DEMO_TOKEN_DELAY": "0.05",
        "DURABLE_STREAMS_LONG_POLL_TIMEOUT": "5",
    }
    for name in ("REDIS_URL", "DURABLE_STREAMS_KEY_PREFIX", "CHAT_LEASE_TTL"):
        env.pop(name, None)
    env.update(extra)
    return env


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Servers:
    """The processes a test starts; stopped at its end, where their logs must hold no traceback."""

    tmp_path: Path
    started: list[Server] = field(default_factory=list)

    def example(self, name: str, env: dict[str, str]) -> Server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = self.tmp_path / f"{name}.log"
        process = spawn(["uvicorn", "main:app", "--port", str(port)], log, f"{url}/healthz", cwd=EXAMPLE, env=env)
        self.started.append(Server(url, process, log))
        return self.started[-1]

    def proxy(self, upstreams: list[str]) -> str:
        log = self.tmp_path / "proxy.log"
        process, url = spawn_proxy(upstreams, log)
        self.started.append(Server(url, process, log))
        return url

    def close(self) -> None:
        for server in self.started:
            stop(server.process)
        for server in self.started:
            text = server.log.read_text()
            assert "Traceback" not in text, f"{server.log.name}:\n{text[-6000:]}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    made = Servers(tmp_path)
    try:
        yield made
    finally:
        made.close()


@dataclass
class ChatTarget:
    """Where a client sends its first requests (``base``) and where the reloaded page goes
    (``reloaded``)."""

    base: str
    reloaded: str


@pytest.fixture(params=["memory", "redis-2-processes-round-robin", "redis-2-processes-reload-on-the-other"])
def chat_target(request: pytest.FixtureRequest, servers: Servers) -> ChatTarget:
    """One example process on memory storage; or two example processes that share one Redis,
    either behind a round-robin proxy (each request of a client goes to the other process than
    the one before) or addressed directly: the page starts on the first, reloads on the second."""
    if request.param == "memory":
        url = servers.example("example", example_env()).url
        return ChatTarget(url, url)
    env = example_env(REDIS_URL=request.getfixturevalue("redis_url"), DURABLE_STREAMS_KEY_PREFIX=unique_prefix())
    first, second = servers.example("example-a", env), servers.example("example-b", env)
    if request.param == "redis-2-processes-round-robin":
        proxy = servers.proxy([first.url, second.url])
        return ChatTarget(proxy, proxy)
    return ChatTarget(first.url, second.url)


# -- small helpers ----------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


def ui_text(message: dict[str, Any]) -> str:
    """The text of a UIMessage, AI SDK (`text`) or TanStack (`content`) parts."""
    return "".join(
        part.get("text", part.get("content", "")) for part in message.get("parts", []) if part.get("type") == "text"
    )


def on(server: str, url: str) -> str:
    """``url`` (an absolute stream URL) with ``server``'s scheme and host: the same stream, read
    through that process."""
    parts = urlsplit(url)
    return f"{server}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def read_whole_stream(url: str, timeout: float) -> tuple[list[dict[str, Any]], bool]:
    """Every JSON item of a stream, read with the protocol's long-poll until it is closed:
    (items, closed)."""
    items: list[dict[str, Any]] = []
    offset = "-1"
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            response = client.get(url, params={"offset": offset, "live": "long-poll"})
            assert response.status_code in (200, 204), f"GET {response.url}: {response.status_code} {response.text}"
            if response.status_code == 200 and response.content:
                items += response.json()
            offset = response.headers.get("Stream-Next-Offset", offset)
            if response.headers.get("Stream-Closed") == "true":
                return items, True
    return items, False


def post_chat(server: str, chat_id: str, prompt: str) -> str:
    """Starts a generation as the AI SDK transport does (its request body): the stream URL."""
    body = {
        "id": chat_id,
        "messages": [{"id": new_id("user"), "role": "user", "parts": [{"type": "text", "text": prompt}]}],
        "trigger": "submit-message",
        "messageId": None,
    }
    response = httpx.post(f"{server}/api/chat", json=body, timeout=10)
    assert response.status_code == 201, f"POST {server}/api/chat: {response.status_code} {response.text}"
    location = response.headers.get("location")
    assert location and response.json() == {"streamUrl": location}, (response.headers, response.text)
    assert response.headers.get("cache-control") == "no-store", response.headers
    assert "location" in response.headers.get("access-control-expose-headers", "").lower(), response.headers
    return location


def is_error_chunk(item: dict[str, Any]) -> bool:
    return item.get("event") == "chunk" and item.get("type") == "error"


# -- AI SDK -----------------------------------------------------------------------------------------


def test_aisdk_refresh_mid_answer_then_reconnect_reads_the_whole_answer_once(
    chat_target: ChatTarget, run_node: Callable[..., NodeScript]
) -> None:
    prompt = "what makes a stream durable?"
    expected = expected_answer(prompt)
    chat_id, user_id = new_id("chat"), new_id("user")
    started = time.monotonic()
    result = run_node(
        "aisdk_refresh",
        {
            "base": chat_target.base,
            "reconnectBase": chat_target.reloaded,
            "chatId": chat_id,
            "messageId": user_id,
            "prompt": prompt,
            "abortAfter": 5,
        },
    ).result(timeout=40)
    print(f"aisdk refresh and reconnect: {time.monotonic() - started:.1f} s")

    before = result["beforeAbort"]
    assert result["abortedMidAnswer"], f"the answer ended before the refresh: {before}"
    assert before["starts"] == 1 and expected.startswith(before["text"]), before
    reconnect = result["reconnect"]
    assert reconnect is not None, "GET /api/chat/{chatId}/stream answered 204 in the middle of the answer"
    assert reconnect["text"] == expected, reconnect
    assert (reconnect["starts"], reconnect["finishes"], reconnect["aborts"], reconnect["errors"]) == (1, 1, 0, []), (
        reconnect
    )
    assert reconnect["last"] == {"type": "finish"}, reconnect
    assert reconnect["messageIds"] == before["messageIds"], "the reconnect read another generation"
    message = result["message"]  # what readUIMessageStream (useChat) assembled
    assert message["role"] == "assistant" and message["text"] == expected, message
    assert message["id"] == reconnect["messageIds"][0], message
    assert result["streamErrors"] == []

    # The server's record of the conversation, and nothing running any more.
    record = httpx.get(f"{chat_target.reloaded}/api/chat/{chat_id}/messages", timeout=10)
    assert record.status_code == 200, record.text
    assert record.json()["active"] is None, record.json()
    got = [(m["role"], ui_text(m)) for m in record.json()["messages"]]
    assert got == [("user", prompt), ("assistant", expected)], record.json()
    assert record.json()["messages"][0]["id"] == user_id
    assert httpx.get(f"{chat_target.reloaded}/api/chat/{chat_id}/stream", timeout=10).status_code == 204


# -- TanStack AI ------------------------------------------------------------------------------------


def test_tanstack_refresh_mid_answer_snapshot_and_a_second_turn(
    chat_target: ChatTarget, run_node: Callable[..., NodeScript]
) -> None:
    prompts = ["how do streams survive a restart?", "and with two workers?"]
    answers = [expected_answer(p) for p in prompts]
    chat_id = new_id("chat")
    user_ids = [new_id("user"), new_id("user")]
    started = time.monotonic()
    result = run_node(
        "tanstack_chat",
        {
            "base": chat_target.base,
            "reconnectBase": chat_target.reloaded,
            "chatId": chat_id,
            "turns": [{"id": i, "prompt": p} for i, p in zip(user_ids, prompts, strict=True)],
            "abortAfter": 5,
            "timeoutMs": 50000,
        },
    ).result(timeout=60)
    print(f"tanstack two turns with a refresh: {time.monotonic() - started:.1f} s")

    def texts(conversation: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(m["role"], m["text"]) for m in conversation]

    first_turn = [("user", prompts[0]), ("assistant", answers[0])]
    turn1 = result["turn1"]
    assert turn1["beforeAbort"]["ended"] is None, f"the answer ended before the refresh: {turn1['beforeAbort']}"
    # The reloaded page of server-side rendering: /snapshot, then the connection from its offset...
    ssr = turn1["ssr"]
    assert ssr["ended"] == "RUN_FINISHED" and ssr["snapshots"] == 0 and ssr["runErrors"] == [], ssr
    assert texts(ssr["conversation"]) == first_turn, ssr
    assert ssr["snapshotMessages"][0] == {"id": user_ids[0], "role": "user", "text": prompts[0]}, ssr
    # ...and the one that starts from nothing: a MESSAGES_SNAPSHOT, then the rest live.
    fresh = turn1["fresh"]
    assert fresh["ended"] == "RUN_FINISHED" and fresh["snapshots"] == 1 and fresh["runErrors"] == [], fresh
    assert texts(fresh["conversation"]) == first_turn, fresh
    assert fresh["conversation"] == ssr["conversation"]

    after_turn1 = result["snapshotAfterTurn1"]["conversation"]
    assert texts(after_turn1) == first_turn, after_turn1
    assert after_turn1[0]["id"] == user_ids[0]

    turn2 = result["turn2"]
    assert turn2["ended"] == "RUN_FINISHED", turn2
    assert (turn2["runStarted"], turn2["runFinished"], turn2["runErrors"]) == (1, 1, []), turn2
    both_turns = [*first_turn, ("user", prompts[1]), ("assistant", answers[1])]
    assert texts(turn2["conversation"]) == both_turns, turn2
    final = result["snapshot"]["conversation"]  # materializeSnapshotFromDurableStream at the end
    assert texts(final) == both_turns, final
    assert [m["id"] for m in final if m["role"] == "user"] == user_ids
    assert len({m["id"] for m in final}) == 4, final

    # The server's own snapshot (for server-side rendering) says the same.
    snapshot = httpx.get(f"{chat_target.reloaded}/api/tanstack/{chat_id}/snapshot", timeout=10)
    assert snapshot.status_code == 200, snapshot.text
    assert [(m["role"], ui_text(m)) for m in snapshot.json()["messages"]] == both_turns, snapshot.json()
    assert snapshot.json()["offset"] == result["snapshot"]["offset"], (snapshot.json()["offset"], result["snapshot"])


# -- faults: the owner of a generation is SIGKILLed -------------------------------------------------


def two_processes_on_redis(servers: Servers, redis_url: str, **extra: str) -> tuple[Server, Server]:
    env = example_env(
        REDIS_URL=redis_url,
        DURABLE_STREAMS_KEY_PREFIX=unique_prefix(),
        DEMO_TOKEN_DELAY="0.3",  # about 20 s of answer: it is far from done when its owner dies
        CHAT_LEASE_TTL=str(LEASE_TTL),
        **extra,
    )
    return servers.example("owner", env), servers.example("survivor", env)


DETECTION_BOUND = 3 * LEASE_TTL + 2  # seconds from the SIGKILL to the error and the close


@pytest.mark.timeout(180)
def test_sigkill_of_the_owner_ends_its_aisdk_answer_with_an_error_on_the_other_process(
    servers: Servers, redis_url: str, run_node: Callable[..., NodeScript]
) -> None:
    owner, survivor = two_processes_on_redis(servers, redis_url)
    prompt = "who ends an orphaned answer?"
    expected = expected_answer(prompt)
    chat_id = new_id("chat")
    stream_url = post_chat(owner.url, chat_id, prompt)
    # A page on the other process resumes the answer, and reads a few chunks of it.
    reader = run_node("aisdk_watch", {"base": survivor.url, "chatId": chat_id, "reportAfter": 3, "timeoutMs": 60000})
    reader.event("progress", timeout=20)

    owner.process.kill()
    killed = time.monotonic()
    owner.process.wait()
    error_seen = reader.wait_for(is_error_chunk, timeout=DETECTION_BOUND + 20, what="an error chunk")
    ended = reader.event("end", timeout=10)
    result = reader.result(timeout=10)["reconnect"]
    print(
        f"SIGKILL of the owner (CHAT_LEASE_TTL={LEASE_TTL}): error chunk after {error_seen - killed:.2f} s, "
        f"end of stream after {ended - killed:.2f} s"
    )
    assert result["last"]["type"] == "error" and len(result["errors"]) == 1, result
    assert result["errors"][0].get("errorText"), result
    print(f"the error chunk: {result['errors'][0]}")
    assert (result["starts"], result["finishes"]) == (1, 0), result
    assert expected.startswith(result["text"]) and result["text"] != expected, result
    assert ended - killed <= DETECTION_BOUND, f"the orphaned answer ended {ended - killed:.2f} s after the SIGKILL"

    # Nothing is running for that chat any more; the stream is closed; the record has the answer.
    assert httpx.get(f"{survivor.url}/api/chat/{chat_id}/stream", timeout=10).status_code == 204
    assert httpx.head(on(survivor.url, stream_url), timeout=10).headers.get("Stream-Closed") == "true"
    items, closed = read_whole_stream(on(survivor.url, stream_url), timeout=10)
    assert closed and [i["type"] for i in items].count("error") == 1 and items[-1]["type"] == "error", items
    record = httpx.get(f"{survivor.url}/api/chat/{chat_id}/messages", timeout=10).json()
    assert record["active"] is None, record
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"], record
    assert expected.startswith(ui_text(record["messages"][1])), record


@pytest.mark.timeout(180)
def test_sigkill_of_the_owner_ends_its_tanstack_run_with_run_error_on_the_other_process(
    servers: Servers, redis_url: str, run_node: Callable[..., NodeScript]
) -> None:
    owner, survivor = two_processes_on_redis(servers, redis_url)
    prompt = "who ends an orphaned run?"
    chat_id = new_id("chat")
    user = {"id": new_id("user"), "role": "user", "parts": [{"type": "text", "content": prompt}]}
    # One connection: send to the owner, subscribe on the other process.
    subscriber = run_node(
        "tanstack_watch",
        {
            "sendUrl": f"{owner.url}/api/tanstack/{chat_id}",
            "readUrl": f"{survivor.url}/api/tanstack/{chat_id}/stream",
            "messages": [user],
            "reportAfter": 3,
            "timeoutMs": 60000,
        },
    )
    subscriber.event("progress", timeout=20)

    owner.process.kill()
    killed = time.monotonic()
    owner.process.wait()
    ended = subscriber.event("end", timeout=DETECTION_BOUND + 20)
    result = subscriber.result(timeout=10)
    print(f"SIGKILL of the owner (CHAT_LEASE_TTL={LEASE_TTL}): RUN_ERROR after {ended - killed:.2f} s")
    assert result["ended"] == "RUN_ERROR", result
    assert result["runError"].get("code") == "orphaned", result["runError"]
    print(f"the RUN_ERROR chunk: {result['runError']}")
    assert ended - killed <= DETECTION_BOUND, f"the orphaned run ended {ended - killed:.2f} s after the SIGKILL"

    # The chat takes a new turn on the surviving process (nothing is running for it any more).
    again = {"id": new_id("user"), "role": "user", "parts": [{"type": "text", "content": "again?"}]}
    response = httpx.post(
        f"{survivor.url}/api/tanstack/{chat_id}", json={"messages": [user, again], "data": None}, timeout=10
    )
    assert response.status_code == 202, f"{response.status_code} {response.text}"
    assert httpx.post(f"{survivor.url}/api/tanstack/{chat_id}/stop", timeout=10).status_code == 204


# -- faults: Redis is SIGKILLed and restarted in the middle of an answer ----------------------------


@pytest.mark.timeout(180)
def test_redis_sigkill_and_restart_mid_answer_the_answer_completes_exactly_once(
    servers: Servers, tmp_path: Path, run_node: Callable[..., NodeScript]
) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=True)
    redis.start()
    try:
        env = example_env(REDIS_URL=redis.url, DURABLE_STREAMS_KEY_PREFIX=unique_prefix(), DEMO_TOKEN_DELAY="0.1")
        example = servers.example("example", env)
        prompt = "does an answer outlive its Redis?"
        expected = expected_answer(prompt)
        chat_id = new_id("chat")
        stream_url = post_chat(example.url, chat_id, prompt)
        live = run_node("aisdk_watch", {"base": example.url, "chatId": chat_id, "reportAfter": 8, "timeoutMs": 60000})
        live.event("progress", timeout=20)

        redis.kill()
        time.sleep(1)  # the outage itself
        redis.start()
        restarted = time.monotonic()

        items, closed = read_whole_stream(stream_url, timeout=30)
        print(f"Redis restart: the stream was closed {time.monotonic() - restarted:.2f} s after the restart")
        assert closed, f"the stream was not closed 30 s after the restart: {items[-3:]}"
        types = [i["type"] for i in items]
        assert "".join(i["delta"] for i in items if i["type"] == "text-delta") == expected, items
        assert (types.count("start"), types.count("finish"), types.count("error")) == (1, 1, 0), types
        assert types[-1] == "finish", types[-3:]

        # The page that was reading during the outage: the client either lived through it
        # (then it saw the same) or gave up; both are reported, only the first is checked.
        try:
            outcome = live.result(timeout=30)["reconnect"]
        except pytest.fail.Exception as exc:
            print(f"Redis restart: the page reading during the outage failed: {str(exc)[:2000]}")
        else:
            print(f"Redis restart: the page reading during the outage lived through it: {outcome['shape']}")
            assert outcome["text"] == expected and outcome["finishes"] == 1 and outcome["errors"] == [], outcome

        record = httpx.get(f"{example.url}/api/chat/{chat_id}/messages", timeout=10).json()
        assert [(m["role"], ui_text(m)) for m in record["messages"]] == [("user", prompt), ("assistant", expected)]
    finally:
        for server in servers.started:
            stop(server.process)  # before its Redis goes
        redis.stop()
