"""Subscriptions with real server processes on one Redis: a webhook receiver that is down while
data arrives, every server process restarted in between, then back: it gets every wake, in
generation order, one at a time, and the cursors end at the tails. Retry state and keys live in
Redis, so the new processes carry on where the old ones stopped."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx

from .conftest import eventually, free_port, spawn, stop, unique_prefix
from .test_conformance import serve_args
from .webhook_receiver import WebhookReceiver, verify_signature

JSON = {"content-type": "application/json"}


def start_servers(
    redis_url: str, prefix: str, tmp_path: Path, round_: int
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    processes, urls = [], []
    for i in range(2):
        port = free_port()
        args = serve_args(port, redis_url, 1, prefix)  # with --allow-loopback-webhooks
        url = f"http://127.0.0.1:{port}"
        processes.append(spawn(args, tmp_path / f"server-{round_}-{i}.log", f"{url}/healthz"))
        urls.append(f"{url}/v1/stream")
    return processes, urls


async def test_a_receiver_down_across_a_restart_of_every_process_gets_every_wake(
    redis_url: str, tmp_path: Path
) -> None:
    prefix = unique_prefix()
    port = free_port()  # the receiver's: nothing listens there until it comes back
    hook = f"http://127.0.0.1:{port}/hook"
    processes, urls = start_servers(redis_url, prefix, tmp_path, 0)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            config = {"type": "webhook", "pattern": "jobs/*", "webhook": {"url": hook}, "lease_ttl_ms": 5000}
            made = await client.put(f"{urls[0]}/__ds/subscriptions/jobs", json=config)
            assert made.status_code == 201, made.text
            kid_before = made.json()["webhook"]["signing"]["kid"]
            for i in range(20):  # appends through both processes, to three streams
                url = f"{urls[i % 2]}/jobs/{i % 3}"
                response = await client.post(url, headers=JSON, content=f'{{"i":{i}}}')
                if response.status_code == 404:
                    response = await client.put(url, headers=JSON, content=f'{{"i":{i}}}')
                assert response.status_code in (200, 201, 204), response.text

            async def failing() -> bool:
                body = (await client.get(f"{urls[1]}/__ds/subscriptions/jobs")).json()
                return body["status"] == "failed"

            await eventually(failing, 15)
        for process in processes:
            stop(process)
        processes, urls = start_servers(redis_url, prefix, tmp_path, 1)

        async with httpx.AsyncClient(timeout=10) as client:
            # Every process is new; the subscription, its cursors and its retry state are not.
            body = (await client.get(f"{urls[0]}/__ds/subscriptions/jobs")).json()
            assert body["status"] == "failed" and body["webhook"]["signing"]["kid"] == kid_before
            tails = {
                f"jobs/{i}": (await client.head(f"{urls[1]}/jobs/{i}")).headers["stream-next-offset"] for i in range(3)
            }
            jwks = (await client.get(f"{urls[1]}/__ds/jwks.json")).json()

            receiver = WebhookReceiver(answer=lambda d: (200, {"done": True}), delay=0.05)
            await receiver.start(port)
            try:

                async def caught_up() -> bool:
                    body = (await client.get(f"{urls[1]}/__ds/subscriptions/jobs")).json()
                    acked = {s["path"]: s["acked_offset"] for s in body["streams"]}
                    return acked == tails and body["status"] == "active"

                await eventually(caught_up, 90)  # the backoff may have grown to a minute
            finally:
                await receiver.close()
        deliveries = receiver.deliveries
        assert deliveries and all(verify_signature(d, jwks) for d in deliveries)
        generations = [d.body["generation"] for d in deliveries]
        assert generations == sorted(set(generations)), generations  # in order, none twice
        assert receiver.most_in_flight == 1
        last = {s["path"]: s["tail_offset"] for s in deliveries[-1].body["streams"]}
        assert last == tails  # the last wake covered everything appended while it was down
    finally:
        for process in processes:
            stop(process)
    assert_no_tracebacks(tmp_path)


def assert_no_tracebacks(directory: Path) -> None:
    for log in directory.glob("server-*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


async def test_rotate_webhook_key_from_the_command_line(redis_url: str, tmp_path: Path) -> None:
    import sys

    from durable_streams_asgi.storage.redis import RedisStorage
    from durable_streams_asgi.subscriptions.keys import Keys

    prefix = unique_prefix()
    storage = RedisStorage.from_url(redis_url, key_prefix=prefix)
    try:
        old = (await Keys(storage).signing_key()).kid
        command = [sys.executable, "-m", "durable_streams_asgi.cli", "rotate-webhook-key"]
        done = await asyncio.to_thread(
            subprocess.run, [*command, "--storage", redis_url, "--key-prefix", prefix], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        new = done.stdout.strip()
        assert new.startswith("ds_") and new != old
        keys = Keys(storage)  # a process that starts now signs with the new key, and publishes both
        assert (await keys.signing_key()).kid == new
        assert {old, new} == {k["kid"] for k in (await keys.jwks())["keys"]}
        memory = await asyncio.to_thread(
            subprocess.run, [*command, "--storage", "memory"], capture_output=True, text=True
        )
        assert memory.returncode == 2 and "memory" in memory.stderr
    finally:
        await storage.aclose()
