"""Sending wakes: a webhook's signed POST (with retries on failure), a pull-wake's wake event.

Only the process holding a wake's send claim (``Wake.sender``, written with the wake) sends it,
from a bounded pool, so a slow or dead receiver holds one slot and never an append or another
subscription. The outcome is written back with compare-and-set against the same wake: if the
wake changed meanwhile (acked by a callback, expired, the subscription deleted), nothing moves.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from ..storage.base import AppendRequest, StorageError, StorageUnavailable
from .manager import SEND_CLAIM_MS, State, Unchanged
from .model import stream_infos
from .outbound import WebhookDeliveryError, WebhookURLRejected

if TYPE_CHECKING:
    from .manager import Subscriptions

logger = logging.getLogger("durable_streams_asgi.subscriptions")

BACKOFF_FIRST_MS = 1000
BACKOFF_MAX_MS = 60_000
JITTER = 0.2


def backoff_ms(failures: int) -> int:
    """The wait after ``failures`` failed attempts in a row: 1 s doubling to 60 s, +-20%."""
    base = min(BACKOFF_FIRST_MS * 2 ** max(0, failures - 1), BACKOFF_MAX_MS)
    return max(0, round(base * (1 + JITTER * (2 * random.random() - 1))))


def _current(state: State | None, wake_id: str, process: str) -> State:
    """The state, if the wake is still the one this process is sending; else nothing to do."""
    if state is None or state.deleted or state.wake is None or state.wake.id != wake_id:
        raise Unchanged
    if state.wake.sender != process or state.wake.sent:
        raise Unchanged
    return state


async def deliver(subs: Subscriptions, sid: str, wake_id: str) -> None:
    """POST the wake to the subscription's webhook, and write down what came of it."""
    async with subs._deliveries:

        async def start(state: State | None, now: int) -> State:
            state = _current(state, wake_id, subs.process)
            # The lease runs from the attempt: a wake waiting out a backoff is not expiring.
            assert state.wake is not None
            state.wake.lease_until = now + state.config.lease_ttl_ms
            # The claim runs from now, not from the wake's opening: the wait for a slot in the
            # pool may have used it up, and another process would send the wake meanwhile.
            state.wake.send_until = now + SEND_CLAIM_MS
            return state

        state, _ = await subs.update(sid, start)
        if state is None:
            return
        wake = state.wake
        assert wake is not None and state.config.webhook_url is not None
        body = json.dumps(
            {
                "subscription_id": sid,
                "wake_id": wake.id,
                "generation": state.generation,
                "streams": stream_infos(state, wake),
                "callback_url": subs.callback_url(state),
                "callback_token": await subs.keys.mint(sid, state.generation, wake.id),
            },
            separators=(",", ":"),
        ).encode()
        headers = {"content-type": "application/json", "webhook-signature": await subs.keys.sign(body)}
        done, failure = False, None
        try:
            response = await subs.client.post(state.config.webhook_url, body, headers)
        except (WebhookDeliveryError, WebhookURLRejected) as exc:
            failure = str(exc)
        else:
            if 200 <= response.status < 300:
                done = _says_done(response.body)
            else:
                failure = f"answered {response.status}"
        if failure is not None:
            logger.info("subscriptions: webhook of %s (generation %d) failed: %s", sid, state.generation, failure)
        await _record_outcome(subs, sid, wake_id, done, failure)


def _says_done(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("done") is True


async def _record_outcome(subs: Subscriptions, sid: str, wake_id: str, done: bool, failure: str | None) -> None:
    async def change(state: State | None, now: int) -> bool:
        state = _current(state, wake_id, subs.process)
        wake = state.wake
        assert wake is not None
        wake.sender, wake.send_until = None, 0
        if failure is not None:
            # Retried by the scheduler once the backoff has passed, as the same wake (same token).
            state.retries += 1
            state.next_attempt_at = now + backoff_ms(state.retries)
            wake.lease_until = None
            return False
        state.retries, state.next_attempt_at = 0, 0
        if not done:
            # The receiver has it: its lease runs from its answer, and callbacks extend it.
            wake.sent, wake.lease_until = True, now + state.config.lease_ttl_ms
            return False
        # {"done": true}: the snapshot is acked, and new data since opens the next wake.
        for path, tail in wake.snapshot.items():
            link = state.links.get(path)
            if link is not None and tail > link.acked:
                link.acked = tail
        state.wake = None
        return await subs.open_wake(state, now, announce=True)

    opened, state = await subs.update(sid, change)
    if opened and state is not None:
        subs.send(state)


async def announce(subs: Subscriptions, sid: str, wake_id: str) -> None:
    """Append the wake event to a pull-wake subscription's wake stream, then mark it sent."""

    state = await subs.load(sid)
    state = _current_or_none(state, wake_id, subs.process)
    if state is None:
        return
    assert state.wake is not None and state.config.wake_stream is not None
    trigger = next(
        (p for p, tail in sorted(state.wake.snapshot.items()) if p in state.links and tail > state.links[p].acked), ""
    )
    event: dict[str, Any] = {
        "type": "wake",
        "subscription_id": sid,
        "stream": trigger,
        "generation": state.generation,
        "ts": int(time.time() * 1000),
    }
    try:
        await subs.storage.append(
            "/" + state.config.wake_stream,
            AppendRequest("application/json", [json.dumps(event, separators=(",", ":")).encode()]),
        )
    except StorageUnavailable:
        raise  # not written: the wake stays unsent, and the scheduler sends it once the claim runs out
    except StorageError as exc:
        # A wake stream the application has not created (or closed): the wake still waits for
        # a claim, which finds the pending work without the event.
        logger.warning("subscriptions: wake event of %s not written to %s: %s", sid, state.config.wake_stream, exc)

    async def mark(state: State | None, now: int) -> None:
        state = _current(state, wake_id, subs.process)
        assert state.wake is not None
        state.wake.sent, state.wake.sender, state.wake.send_until = True, None, 0

    await subs.update(sid, mark)


def _current_or_none(state: State | None, wake_id: str, process: str) -> State | None:
    try:
        return _current(state, wake_id, process)
    except Unchanged:
        return None
