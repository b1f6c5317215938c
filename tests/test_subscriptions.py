"""Subscriptions (PROTOCOL.md sections 6 and 7) over every backend, two "processes" per test on
Redis (two DurableStreams on one Redis and key prefix; on memory, one process): the API, webhook
delivery with signatures, callbacks and fencing, pull-wake claims and leases, retries, deletion,
and the reserved prefix. Webhooks go to a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from durable_streams_asgi import DurableStreams
from durable_streams_asgi.subscriptions import delivery

from .conftest import StorageFactory, eventually
from .webhook_receiver import WebhookReceiver, verify_signature

ROOT = "http://testserver/v1/stream"
JSON = {"content-type": "application/json"}


class Node:
    """One process's worth: the streams and a client that calls its app."""

    def __init__(self, streams: DurableStreams, client: httpx.AsyncClient) -> None:
        self.streams, self.client = streams, client

    async def put_sub(self, sid: str, **config: Any) -> httpx.Response:
        return await self.client.put(f"/__ds/subscriptions/{sid}", json=config)

    async def append(self, path: str, value: Any) -> None:
        response = await self.client.post(f"/{path}", headers=JSON, content=json.dumps(value))
        if response.status_code == 404:
            response = await self.client.put(f"/{path}", headers=JSON, content=json.dumps(value))
        assert response.status_code in (200, 201, 204), response.text

    async def tail(self, path: str) -> str:
        return (await self.client.head(f"/{path}")).headers["stream-next-offset"]


@pytest.fixture
async def nodes(storage_factory: StorageFactory, backend: str) -> AsyncIterator[list[Node]]:
    made: list[Node] = []
    stack = contextlib.AsyncExitStack()
    async with stack:
        first = await storage_factory()
        for storage in (first, first if backend == "memory" else await storage_factory()):
            streams = DurableStreams(storage, allow_loopback_webhooks=True, drain_on_signals=False)
            if made and storage is made[0].streams.storage:
                streams = made[0].streams  # memory: one process
            else:
                await stack.enter_async_context(streams.lifespan())
            app = Starlette(routes=[Mount("/v1/stream", app=streams.app)])
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ROOT, timeout=20)
            await stack.enter_async_context(client)
            made.append(Node(streams, client))
        yield made


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = await WebhookReceiver().start()
    try:
        yield server
    finally:
        await server.close()


async def acked(node: Node, sid: str, path: str) -> str | None:
    body = (await node.client.get(f"/__ds/subscriptions/{sid}")).json()
    return next((s["acked_offset"] for s in body["streams"] if s["path"] == path), None)


# -- the API --------------------------------------------------------------------------------------


async def test_create_confirm_conflict_read_delete(nodes: list[Node], receiver: WebhookReceiver) -> None:
    a, b = nodes
    config = {"type": "webhook", "pattern": "events/*", "webhook": {"url": receiver.url}, "description": "d"}
    created = await a.put_sub("s1", **config)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == body["subscription_id"] == "s1" and body["status"] == "active"
    assert body["webhook"]["signing"]["alg"] == "ed25519" and body["webhook"]["signing"]["kid"].startswith("ds_")
    assert body["webhook"]["signing"]["jwks_url"] == f"{ROOT}/__ds/jwks.json"
    assert body["lease_ttl_ms"] == 30000 and body["wake_stream"] is None and "webhook_secret" not in body
    # Identical (streams order and duplicates do not matter): 200, from the other process too.
    assert (await b.put_sub("s1", **config)).status_code == 200
    assert (await b.put_sub("s1", **{**config, "description": "other"})).status_code == 409
    got = await b.client.get("/__ds/subscriptions/s1")
    assert got.status_code == 200 and got.json()["pattern"] == "events/*"
    # Both processes sign with one key, published at the JWK Set.
    jwks = await b.client.get("/__ds/jwks.json")
    assert jwks.headers["content-type"] == "application/jwk-set+json"
    assert jwks.headers["cache-control"] == "public, max-age=300"
    assert body["webhook"]["signing"]["kid"] in [k["kid"] for k in jwks.json()["keys"]]
    assert (await a.client.delete("/__ds/subscriptions/s1")).status_code == 204
    assert (await b.client.get("/__ds/subscriptions/s1")).json()["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"
    assert (await b.client.delete("/__ds/subscriptions/s1")).status_code == 404
    # A deleted id can be created again, with any configuration.
    assert (await b.put_sub("s1", **{**config, "description": "new"})).status_code == 201


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"type": "webhook", "pattern": "a/*", "webhook": {"url": "http://10.0.0.1/hook"}}, "WEBHOOK_URL_REJECTED"),
        ({"type": "webhook", "pattern": "a/*", "webhook": {"url": "https://169.254.169.254/"}}, "WEBHOOK_URL_REJECTED"),
        (
            {"type": "webhook", "pattern": "a/*", "webhook": {"url": "https://[::ffff:10.0.0.1]/"}},
            "WEBHOOK_URL_REJECTED",
        ),
        ({"type": "webhook", "pattern": "a/*", "webhook": {"url": "ftp://example.com/"}}, "WEBHOOK_URL_REJECTED"),
        ({"type": "webhook", "pattern": "a/*"}, "INVALID_REQUEST"),
        ({"type": "push", "pattern": "a/*"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "pattern": "a/*"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "wake_stream": "w"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "pattern": "a/**x", "wake_stream": "w"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 999}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 600001}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": True}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "streams": ["a/../b"], "wake_stream": "w"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "streams": ["__ds/x"], "wake_stream": "w"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "streams": ["w"], "wake_stream": "w"}, "INVALID_REQUEST"),
        ({"type": "pull-wake", "streams": "a", "wake_stream": "w"}, "INVALID_REQUEST"),
    ],
)
async def test_bad_configurations_get_400_and_create_nothing(
    nodes: list[Node], config: dict[str, Any], code: str
) -> None:
    a = nodes[0]
    response = await a.put_sub("bad", **config)
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text
    assert (await a.client.get("/__ds/subscriptions/bad")).status_code == 404


async def test_loopback_webhooks_need_the_option(storage_factory: StorageFactory) -> None:
    streams = DurableStreams(await storage_factory(), drain_on_signals=False)
    async with (
        streams.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=streams.app), base_url="http://t") as c,
    ):
        for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://[::1]:9/"):
            response = await c.put(
                "/__ds/subscriptions/x", json={"type": "webhook", "pattern": "a", "webhook": {"url": url}}
            )
            assert response.json()["error"]["code"] == "WEBHOOK_URL_REJECTED", url


async def test_the_reserved_prefix_is_never_a_stream(nodes: list[Node]) -> None:
    a = nodes[0]
    for method in ("PUT", "POST", "GET", "HEAD", "DELETE"):
        response = await a.client.request(method, "/__ds/my-stream", headers={"content-type": "text/plain"})
        assert response.status_code in (404, 405), (method, response.status_code)
    assert (await a.client.request("PUT", "/__ds", headers={"content-type": "text/plain"})).status_code == 404
    assert (await a.client.get("/__ds/subscriptions/x/nothing")).status_code == 404
    assert (await a.client.post("/__ds/subscriptions/x")).status_code == 405
    assert (await a.client.get("/__ds/subscriptions/%00")).status_code == 400
    # Streams whose names merely begin with __ds are ordinary.
    assert (await a.client.put("/__dsx", headers={"content-type": "text/plain"})).status_code == 201


async def test_membership_explicit_and_glob(nodes: list[Node], receiver: WebhookReceiver) -> None:
    a, b = nodes
    await a.append("ev/old", {"n": 0})  # existing: linked at its tail, history not replayed
    old_tail = await a.tail("ev/old")
    config = {"type": "webhook", "pattern": "ev/*", "streams": ["manual/a"], "webhook": {"url": receiver.url}}
    assert (await a.put_sub("m", **config)).status_code == 201
    streams = {s["path"]: s for s in (await b.client.get("/__ds/subscriptions/m")).json()["streams"]}
    assert streams["ev/old"] == {"path": "ev/old", "link_type": "glob", "acked_offset": old_tail}
    assert streams["manual/a"]["link_type"] == "explicit"
    add = await b.client.post("/__ds/subscriptions/m/streams", json={"streams": ["manual/b", "ev/old"]})
    assert add.status_code == 204
    streams = {s["path"]: s for s in (await a.client.get("/__ds/subscriptions/m")).json()["streams"]}
    assert streams["ev/old"]["link_type"] == "explicit" and "manual/b" in streams
    for path in ("manual%2Fb", "ev%2Fold", "never%2Flinked"):
        assert (await a.client.delete(f"/__ds/subscriptions/m/streams/{path}")).status_code == 204
    streams = {s["path"]: s for s in (await a.client.get("/__ds/subscriptions/m")).json()["streams"]}
    assert "manual/b" not in streams  # gone: it was only explicit
    assert streams["ev/old"]["link_type"] == "glob"  # the pattern still matches it
    assert (await a.client.post("/__ds/subscriptions/m/streams", json={"streams": []})).status_code == 400


# -- webhooks -------------------------------------------------------------------------------------


async def test_webhook_done_acks_the_snapshot_and_new_data_wakes_again(
    nodes: list[Node], receiver: WebhookReceiver
) -> None:
    a, b = nodes
    receiver.answer = lambda d: (200, {"done": True})
    await a.put_sub("w", type="webhook", pattern="jobs/*", webhook={"url": receiver.url}, lease_ttl_ms=5000)
    jwks = (await a.client.get("/__ds/jwks.json")).json()
    await b.append("jobs/1", {"job": 1})  # created by the other process, after the subscription
    first = (await receiver.wait_for(1))[0]
    assert verify_signature(first, jwks)
    body = first.body
    assert body["subscription_id"] == "w" and body["generation"] == 1
    assert body["callback_url"] == f"{ROOT}/__ds/subscriptions/w/callback"
    [stream] = body["streams"]
    assert stream["path"] == "jobs/1" and stream["has_pending"] and stream["acked_offset"] == "0" * 16 + "_" + "0" * 16
    assert stream["tail_offset"] == await a.tail("jobs/1")
    await eventually(lambda: _equal(acked(a, "w", "jobs/1"), stream["tail_offset"]))
    await a.append("jobs/1", {"job": 2})
    second = (await receiver.wait_for(2))[1]
    assert second.body["generation"] == 2 and second.body["wake_id"] != body["wake_id"]
    assert second.body["streams"][0]["acked_offset"] == stream["tail_offset"]
    await eventually(lambda: _equal(acked(b, "w", "jobs/1"), second.body["streams"][0]["tail_offset"]))
    assert len(receiver.deliveries) == 2  # nothing pending: no third wake


async def _equal(value: Any, expected: Any) -> bool:
    return (await value) == expected


async def test_callbacks_ack_extend_and_fence(nodes: list[Node], receiver: WebhookReceiver) -> None:
    a, b = nodes
    await a.put_sub("cb", type="webhook", streams=["q/1", "q/2"], webhook={"url": receiver.url}, lease_ttl_ms=5000)
    await a.put_sub("other", type="webhook", streams=["q/3"], webhook={"url": receiver.url})
    await a.append("q/1", {"x": 1})
    wake = (await receiver.wait_for(1))[0].body
    await a.append("q/2", {"x": 2})  # after the wake opened: past its snapshot, ackable up to the tail
    tails = {"q/1": wake["streams"][0]["tail_offset"], "q/2": await a.tail("q/2")}
    auth = {"authorization": f"Bearer {wake['callback_token']}"}
    url = wake["callback_url"]

    async def call(body: dict[str, Any], headers: dict[str, str] | None = None, node: Node = b) -> httpx.Response:
        return await node.client.post(url, json=body, headers=auth if headers is None else headers)

    base = {"wake_id": wake["wake_id"], "generation": wake["generation"]}
    # A heartbeat with a partial ack, through the other process.
    partial = await call({**base, "acks": [{"stream": "q/1", "offset": tails["q/1"]}]})
    assert partial.status_code == 200 and partial.json() == {"ok": True, "next_wake": False}
    assert await acked(a, "cb", "q/1") == tails["q/1"]
    # Refused, moving nothing: unknown stream, past the tail, before the cursor, bad offset.
    for acks, code in [
        ([{"stream": "q/9", "offset": tails["q/1"]}], "INVALID_OFFSET"),
        ([{"stream": "q/2", "offset": "0000000000000000_0000000000000099"}], "INVALID_OFFSET"),
        ([{"stream": "q/1", "offset": "0000000000000000_0000000000000000"}], "INVALID_OFFSET"),
        ([{"stream": "q/2", "offset": "garbage"}], "INVALID_OFFSET"),
    ]:
        response = await call({**base, "acks": acks})
        assert response.status_code == 409 and response.json()["error"]["code"] == code, response.text
    assert (await call({**base, "done": "yes"})).status_code == 400
    assert (await call(base, headers={})).status_code == 401
    assert (await call(base, headers={"authorization": "Bearer forged.token"})).json()["error"][
        "code"
    ] == "TOKEN_INVALID"
    other_url = url.replace("/cb/", "/other/")
    assert (await b.client.post(other_url, json=base, headers=auth)).status_code == 401  # another subscription's token
    assert (await call({**base, "generation": base["generation"] + 1})).json()["error"]["code"] == "FENCED"
    assert (await call({**base, "wake_id": "w_nope"})).json()["error"]["code"] == "FENCED"
    assert await acked(a, "cb", "q/2") == "0" * 16 + "_" + "0" * 16
    # Done: acked, and the same callback again is fenced.
    done = await call({**base, "acks": [{"stream": "q/2", "offset": tails["q/2"]}], "done": True}, node=a)
    assert done.json() == {"ok": True, "next_wake": False}
    again = await call({**base, "done": True})
    assert again.status_code == 409 and again.json()["error"]["code"] == "FENCED"
    assert await acked(b, "cb", "q/2") == tails["q/2"]


async def test_a_deleted_subscription_refuses_callbacks_and_moves_nothing(
    nodes: list[Node], receiver: WebhookReceiver
) -> None:
    a, b = nodes
    await a.put_sub("del", type="webhook", streams=["d/1"], webhook={"url": receiver.url})
    await a.append("d/1", {"x": 1})
    wake = (await receiver.wait_for(1))[0].body
    assert (await b.client.delete("/__ds/subscriptions/del")).status_code == 204
    body = {"wake_id": wake["wake_id"], "generation": wake["generation"], "done": True}
    body["acks"] = [{"stream": "d/1", "offset": wake["streams"][0]["tail_offset"]}]
    response = await a.client.post(
        wake["callback_url"], json=body, headers={"authorization": f"Bearer {wake['callback_token']}"}
    )
    assert response.status_code == 404
    await a.append("d/1", {"x": 2})  # no more wakes
    await asyncio.sleep(0.3)
    assert len(receiver.deliveries) == 1


async def test_a_failing_receiver_is_retried_with_backoff_then_gets_everything(
    nodes: list[Node], receiver: WebhookReceiver
) -> None:
    a, b = nodes
    receiver.down = True
    await a.put_sub("r", type="webhook", pattern="r/*", webhook={"url": receiver.url})
    await a.append("r/1", {"x": 1})
    await eventually(lambda: _at_least(lambda: receiver.refused, 2), timeout=15)  # 1 s after the first
    status = (await b.client.get("/__ds/subscriptions/r")).json()["status"]
    assert status == "failed"
    await b.append("r/1", {"x": 2})
    await b.append("r/2", {"x": 3})
    receiver.down = False
    receiver.answer = lambda d: (200, {"done": True})
    tails = {"r/1": await a.tail("r/1"), "r/2": await a.tail("r/2")}

    async def caught_up() -> bool:
        body = (await a.client.get("/__ds/subscriptions/r")).json()
        return {s["path"]: s["acked_offset"] for s in body["streams"]} == tails and body["status"] == "active"

    await eventually(caught_up, timeout=20)
    generations = [d.body["generation"] for d in receiver.deliveries]
    assert generations == sorted(generations) and len(set(generations)) == len(generations)


async def _at_least(value: Callable[[], int], count: int) -> bool:
    return value() >= count


def test_backoff_doubles_from_one_second_to_a_minute_with_jitter() -> None:
    for failures, base in [(1, 1000), (2, 2000), (3, 4000), (7, 60000), (30, 60000)]:
        samples = [delivery.backoff_ms(failures) for _ in range(200)]
        assert all(base * 0.8 <= s <= base * 1.2 for s in samples), failures
        assert len(set(samples)) > 1


async def test_two_processes_never_send_one_wake_twice(
    nodes: list[Node], receiver: WebhookReceiver, backend: str
) -> None:
    """Appends through both processes at once; the receiver holds each webhook a while. Every
    wake arrives once, one at a time, generations in order, and all data ends up acked."""
    a, b = nodes
    receiver.delay = 0.05
    receiver.answer = lambda d: (200, {"done": True})
    await a.put_sub("c", type="webhook", pattern="c/*", webhook={"url": receiver.url}, lease_ttl_ms=10000)
    await asyncio.gather(*(node.append(f"c/{i % 3}", {"i": i}) for i in range(40) for node in (a, b)))
    tails = {f"c/{i}": await a.tail(f"c/{i}") for i in range(3)}

    async def caught_up() -> bool:
        body = (await b.client.get("/__ds/subscriptions/c")).json()
        return {s["path"]: s["acked_offset"] for s in body["streams"]} == tails

    await eventually(caught_up, timeout=20)
    wake_ids = [d.body["wake_id"] for d in receiver.deliveries]
    assert len(wake_ids) == len(set(wake_ids))
    generations = [d.body["generation"] for d in receiver.deliveries]
    assert generations == sorted(generations)
    assert receiver.most_in_flight == 1


# -- pull-wake ------------------------------------------------------------------------------------


async def test_pull_wake_claim_ack_release_and_leases(nodes: list[Node]) -> None:
    a, b = nodes
    assert (await a.client.put("/wake/pool", headers=JSON, content=b"[]")).status_code == 201
    made = await a.put_sub("p", type="pull-wake", pattern="work/*", wake_stream="wake/pool", lease_ttl_ms=1000)
    assert made.status_code == 201
    claim = {"worker": "w1"}
    nothing = await b.client.post("/__ds/subscriptions/p/claim", json=claim)
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "NO_PENDING_WORK"
    await b.append("work/1", {"n": 1})

    async def events() -> list[dict[str, Any]]:
        return (await a.client.get("/wake/pool", params={"offset": "-1"})).json()

    [event] = await eventually(events)
    assert event["type"] == "wake" and event["subscription_id"] == "p" and event["stream"] == "work/1"
    first = await a.client.post("/__ds/subscriptions/p/claim", json=claim)
    assert first.status_code == 200, first.text
    wake = first.json()
    assert wake["generation"] == event["generation"] and wake["lease_ttl_ms"] == 1000
    busy = await b.client.post("/__ds/subscriptions/p/claim", json={"worker": "w2"})
    assert busy.status_code == 409 and busy.json()["error"] == {
        "code": "ALREADY_CLAIMED", "message": "another worker holds the lease", "current_holder": "w1",
        "generation": wake["generation"],
    }  # fmt: skip
    token = {"authorization": f"Bearer {wake['token']}"}
    base = {"wake_id": wake["wake_id"], "generation": wake["generation"]}
    tail = wake["streams"][0]["tail_offset"]
    # Heartbeats keep the lease past its 1 s.
    for _ in range(3):
        beat = await b.client.post("/__ds/subscriptions/p/ack", json=base, headers=token)
        assert beat.json() == {"ok": True, "next_wake": False}
        await asyncio.sleep(0.4)
    assert (await a.client.post("/__ds/subscriptions/p/claim", json={"worker": "w2"})).status_code == 409
    ack = await a.client.post(
        "/__ds/subscriptions/p/ack",
        json={**base, "acks": [{"stream": "work/1", "offset": tail}], "done": True},
        headers=token,
    )
    assert ack.json() == {"ok": True, "next_wake": False}
    assert (await a.client.post("/__ds/subscriptions/p/ack", json=base, headers=token)).json()["error"][
        "code"
    ] == "FENCED"

    # New work: claimed at once (the claim finds it), released, and the wake event written again.
    await a.append("work/1", {"n": 2})
    second = (await b.client.post("/__ds/subscriptions/p/claim", json={"worker": "w1"})).json()
    assert second["generation"] > wake["generation"]
    token2 = {"authorization": f"Bearer {second['token']}"}
    base2 = {"wake_id": second["wake_id"], "generation": second["generation"]}
    assert (await a.client.post("/__ds/subscriptions/p/release", json=base2, headers=token2)).status_code == 204
    assert (await a.client.post("/__ds/subscriptions/p/release", json=base2, headers=token2)).status_code == 409
    await eventually(lambda: _longer(events, 1))  # pending work after a release: a new wake event
    # A holder that stops heartbeating loses the lease: another worker claims a new generation.
    third = (await b.client.post("/__ds/subscriptions/p/claim", json={"worker": "w1"})).json()

    async def taken_over() -> Any:
        response = await a.client.post("/__ds/subscriptions/p/claim", json={"worker": "w2"})
        return response.json() if response.status_code == 200 else None

    fourth = await eventually(taken_over, timeout=5)
    assert fourth["generation"] > third["generation"]
    stale = {"wake_id": third["wake_id"], "generation": third["generation"], "done": True}
    late = await a.client.post(
        "/__ds/subscriptions/p/ack", json=stale, headers={"authorization": f"Bearer {third['token']}"}
    )
    assert late.json()["error"]["code"] == "FENCED"


async def _longer(read: Callable[[], Any], than: int) -> bool:
    return len(await read()) > than


async def test_a_wake_stream_never_wakes_its_own_subscription(nodes: list[Node]) -> None:
    a, _ = nodes
    await a.client.put("/loop/wake", headers=JSON, content=b"[]")
    await a.put_sub("loop", type="pull-wake", pattern="loop/**", wake_stream="loop/wake")
    await a.append("loop/data", {"n": 1})
    claimed = (await a.client.post("/__ds/subscriptions/loop/claim", json={"worker": "w"})).json()
    assert "streams" in claimed, claimed
    assert [s["path"] for s in claimed["streams"]] == ["loop/data"]


async def test_the_in_process_api(nodes: list[Node], receiver: WebhookReceiver) -> None:
    a, b = nodes
    subs = a.streams.subscriptions
    view = await subs.create(
        "api",
        {"type": "webhook", "streams": ["in/1"], "webhook": {"url": receiver.url}},
        base_url="https://x.example/v1/stream/",
    )
    assert (
        view["id"] == "api" and view["webhook"]["signing"]["jwks_url"] == "https://x.example/v1/stream/__ds/jwks.json"
    )
    await b.streams.create("/in/1", content_type="application/json", messages=[{"n": 1}])  # the in-process API's append
    wake = (await receiver.wait_for(1))[0].body
    assert wake["callback_url"] == "https://x.example/v1/stream/__ds/subscriptions/api/callback"
    old = (await subs.keys.signing_key()).kid
    new = await subs.keys.rotate()
    jwks = (await a.client.get("/__ds/jwks.json")).json()
    assert {old, new} <= {k["kid"] for k in jwks["keys"]}  # the old key stays published
    with pytest.raises(Exception) as bad:
        await subs.create("api2", {"type": "webhook"}, base_url="https://x.example")
    assert getattr(bad.value, "code", None) == "INVALID_REQUEST"


async def test_the_authorize_hook_covers_management_and_tokens_cover_callbacks(
    storage_factory: StorageFactory, receiver: WebhookReceiver
) -> None:
    """Management goes through authorize (action ``subscribe``); a callback carries the wake's
    token in Authorization, which the hook never sees (a service token check would refuse it)."""
    from durable_streams_asgi import TokenAuth

    asked: list[tuple[str, str]] = []
    tokens = TokenAuth(write_tokens=["service-token"])

    def authorize(request: Any, action: str, path: str) -> bool:
        asked.append((action, path))
        return tokens(request, action, path)

    streams = DurableStreams(
        await storage_factory(), authorize=authorize, allow_loopback_webhooks=True, drain_on_signals=False
    )
    transport = httpx.ASGITransport(app=streams.app)
    service = {"authorization": "Bearer service-token"}
    async with streams.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        config = {"type": "webhook", "streams": ["a/1"], "webhook": {"url": receiver.url}}
        assert (await c.put("/__ds/subscriptions/s", json=config)).status_code == 401
        assert (
            await c.put("/__ds/subscriptions/s", json=config, headers={"authorization": "Bearer nope"})
        ).status_code == 401
        assert (await c.put("/__ds/subscriptions/s", json=config, headers=service)).status_code == 201
        assert asked[-1] == ("subscribe", "/__ds/subscriptions/s")
        assert (await c.get("/__ds/subscriptions/s")).status_code == 401
        assert (await c.get("/__ds/jwks.json")).status_code == 200  # public
        await c.put("/a/1", headers={**JSON, **service}, content=b"[1]")
        wake = (await receiver.wait_for(1))[0].body
        before = len(asked)
        callback = await c.post(
            wake["callback_url"].replace("http://t", ""),
            json={"wake_id": wake["wake_id"], "generation": wake["generation"], "done": True},
            headers={"authorization": f"Bearer {wake['callback_token']}"},
        )
        assert callback.status_code == 200 and len(asked) == before


def test_patterns_match_in_linear_time() -> None:
    """A regular expression per star backtracked: this pattern against this path took minutes
    (one append froze the event loop). It must not match, and must answer at once (the test's
    timeout is the bound)."""
    from durable_streams_asgi.globs import PathGlob

    glob = PathGlob("/e/*a*a*a*a*a*a*a*a*a*a*a*a*b")
    assert not glob.match("/e/" + "a" * 80)
    assert glob.match("/e/" + "a" * 80 + "b")
    assert PathGlob("/x/**/y/**/z").match("/x/1/y/2/3/z") and not PathGlob("/x/**/y/**/z").match("/x/y/z/y")


async def test_odd_memberships(nodes: list[Node], receiver: WebhookReceiver) -> None:
    a, b = nodes
    await a.append("base", {"n": 1})  # "base/**" matches "base" itself: backfilled too
    await a.client.put("/wk", headers=JSON, content=b"[]")
    assert (await a.put_sub("o", type="pull-wake", pattern="base/**", wake_stream="wk")).status_code == 201
    paths = [s["path"] for s in (await b.client.get("/__ds/subscriptions/o")).json()["streams"]]
    assert paths == ["base"]
    own = await b.client.post("/__ds/subscriptions/o/streams", json={"streams": ["wk"]})
    assert own.status_code == 400  # its own wake stream would wake it forever

    # A stream deleted and made again under its cursor: its new data is pending from 0.
    await a.append("base/x", {"n": 1})
    await a.append("base/x", {"n": 2})
    claim = (await a.client.post("/__ds/subscriptions/o/claim", json={"worker": "w"})).json()
    auth = {"authorization": f"Bearer {claim['token']}"}
    acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in claim["streams"]]
    done = {"wake_id": claim["wake_id"], "generation": claim["generation"], "acks": acks, "done": True}
    assert (await a.client.post("/__ds/subscriptions/o/ack", json=done, headers=auth)).json()["ok"]
    assert (await a.client.delete("/base/x")).status_code == 204
    await b.append("base/x", {"n": "new"})
    again = (await b.client.post("/__ds/subscriptions/o/claim", json={"worker": "w"})).json()
    [stream] = [s for s in again["streams"] if s["path"] == "base/x"]
    assert stream["acked_offset"] == "0" * 16 + "_" + "0" * 16 and stream["has_pending"]
