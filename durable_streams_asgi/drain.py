"""Graceful drain: end live reads promptly when the server is asked to stop.

An ASGI server that is told to stop (SIGTERM) stops accepting connections and waits for the open
ones to finish before it runs the application's lifespan shutdown. Live reads do not finish by
themselves: an SSE response lasts ``sse_max_duration`` (60 s) and a long-poll up to its timeout,
so the process lingers past an orchestrator's grace period and is killed with its generations
half-written. The application learns of the stop only from the signal, so
:func:`on_stop_signals` chains a handler in front of the server's own: it starts the drain (SSE
readers get a last control event and the end of their response, so that clients reconnect to
another server from where they were; waiting long-polls are answered; running generations get a
bounded time) and then calls the server's handler, which goes on as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger("durable_streams_asgi")

#: The signals ASGI servers (uvicorn, hypercorn, gunicorn's workers) take as "stop gracefully".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drain:
    """Whether the server is draining: set once, read by the handler and every live reader
    (a plain attribute read on their paths), with callbacks for those that must act."""

    __slots__ = ("_callbacks", "started")

    def __init__(self) -> None:
        self.started = False
        self._callbacks: list[Callable[[], None]] = []

    def on_begin(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def begin(self) -> bool:
        """Start draining; False if it had started already."""
        if self.started:
            return False
        self.started = True
        for callback in self._callbacks:
            try:
                callback()
            except Exception:
                logger.exception("a drain callback failed")
        return True


_Handler = Callable[[int, FrameType | None], Any] | int | None


def on_stop_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` in the running event loop when the process gets SIGTERM or SIGINT, then
    let the handler that was installed before (the ASGI server's) handle the signal as usual.

    Returns a function that puts the previous handlers back (where ours is still the one
    installed; a server that restored its own meanwhile is left alone). Outside the main thread
    (signals can only be handled there) this does nothing and returns a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, _Handler] = {}

    def handle(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to drain
            loop.call_soon_threadsafe(callback)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            # Nobody handled it before us: do what would have happened (terminate, or raise
            # KeyboardInterrupt for SIGINT), after the drain had its moment to start.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            loop.call_later(0.0, signal.raise_signal, signum)

    for signum in STOP_SIGNALS:
        try:
            previous[signum] = signal.getsignal(signum)
            if previous[signum] == signal.SIG_IGN:
                continue  # the host wants this signal ignored: so be it
            signal.signal(signum, handle)
        except (ValueError, OSError):  # not allowed here (an embedded interpreter)
            previous.pop(signum, None)

    def restore() -> None:
        for signum, before in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                if signal.getsignal(signum) is handle and before is not None:
                    signal.signal(signum, before)

    return restore
