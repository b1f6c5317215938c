"""A test-only HTTP reverse proxy that sends each request to the next upstream in turn.

Put in front of two server processes, it makes consecutive requests of one client land on
different processes, so a conformance run exercises cross-process behaviour on every step
(a write on one process, the read or the live wake-up on the other).

    python -m tests.roundrobin --port 8000 --upstream http://127.0.0.1:9001 --upstream http://127.0.0.1:9002
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from typing import Any

import httpx
import uvicorn

# Connection-level headers are not forwarded (RFC 9110 section 7.6.1).
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
    b"content-length",
}


class RoundRobinProxy:
    def __init__(self, upstreams: list[str]) -> None:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self._clients = [httpx.AsyncClient(base_url=u, timeout=None, limits=limits) for u in upstreams]
        self._turn = itertools.cycle(self._clients)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            for client in self._clients:
                await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        client = next(self._turn)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        request = client.build_request(scope["method"], target, headers=headers, content=body)
        response = await client.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP],
                }
            )
            # Stream the body (SSE, long-poll) until it ends or the client goes away.
            relay = asyncio.ensure_future(self._relay(response, send))
            gone = asyncio.ensure_future(self._disconnected(receive))
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (relay, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            await response.aclose()

    @staticmethod
    async def _relay(response: httpx.Response, send: Any) -> None:
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _disconnected(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", required=True)
    args = parser.parse_args()
    uvicorn.run(RoundRobinProxy(args.upstream), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
