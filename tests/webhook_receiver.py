"""A real HTTP server that receives webhooks, for the subscription tests: it records each request
(with when it started and ended, to see overlaps), answers what the test says, and lets the test
wait for the next request as an event."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass
class Delivery:
    headers: dict[str, str]
    raw: bytes
    started: float
    ended: float = 0.0

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw)


@dataclass
class WebhookReceiver:
    """``answer(delivery)`` gives (status, JSON body); by default 200 ``{}``. ``down`` makes it
    close connections without answering; ``delay`` holds each answer that long."""

    answer: Any = None
    down: bool = False
    delay: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    refused: int = 0
    _server: asyncio.Server | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self, port: int = 0) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                if self.down:
                    self.refused += 1
                    writer.close()
                    return
                delivery = Delivery(headers, raw, time.monotonic())
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                try:
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    status, body = self.answer(delivery) if self.answer else (200, {})
                finally:
                    self.in_flight -= 1
                payload = json.dumps(body).encode()
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, len(payload), payload)
                )
                await writer.drain()
                delivery.ended = time.monotonic()
                async with self._arrived:
                    self.deliveries.append(delivery)
                    self._arrived.notify_all()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Until ``count`` deliveries arrived in all: them."""

        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.deliveries) >= count)

        await asyncio.wait_for(enough(), timeout)
        return self.deliveries[:count]


def verify_signature(delivery: Delivery, jwks: dict[str, Any]) -> bool:
    """The receiver's check of ``Webhook-Signature``: Ed25519 over ``t.body``, key by kid."""
    parts = dict(part.split("=", 1) for part in delivery.headers["webhook-signature"].split(","))
    key = next(k for k in jwks["keys"] if k["kid"] == parts["kid"])
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"] + "=="))
    signature = base64.urlsafe_b64decode(parts["ed25519"] + "==")
    try:
        public.verify(signature, parts["t"].encode() + b"." + delivery.raw)
    except Exception:
        return False
    return abs(time.time() - int(parts["t"])) < 300
