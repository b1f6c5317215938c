"""What workers send for a wake: a pull-wake claim, and acks, releases and webhook callbacks,
each fenced on the wake's token, generation and id before it moves a cursor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import (
    State,
    SubscriptionError,
    decode,
    earliest,
    fenced,
    invalid,
    link_hinted,
    not_found,
    relative_path,
    stream_infos,
)

if TYPE_CHECKING:
    from .manager import Subscriptions


async def claim(subs: Subscriptions, sid: str, worker: str) -> dict[str, Any]:
    async def change(state: State | None, now: int) -> None:
        if state is None or state.deleted:
            raise not_found()
        if state.config.type != "pull-wake":
            raise invalid("claims are for pull-wake subscriptions")
        wake = state.wake
        if wake is not None and wake.holder is not None:
            if wake.lease_until is not None and wake.lease_until > now:
                raise SubscriptionError(
                    409, "ALREADY_CLAIMED", "another worker holds the lease",
                    current_holder=wake.holder, generation=state.generation,
                )  # fmt: skip
            state.wake = wake = None  # its lease ran out: the work goes to a new generation
        if wake is None:
            # Appends of this process not looked at yet (their evaluation is queued): a claim
            # that follows an append at once must find that work.
            link_hinted(state, earliest([*subs._applying.get(sid, []), subs._hints.get(sid, {})]))
            if not await subs.open_wake(state, now, announce=False):
                raise SubscriptionError(409, "NO_PENDING_WORK", "no linked stream has data past its cursor")
            wake = state.wake
            assert wake is not None
            wake.sent = True  # the claimer has it: no event to write
        wake.holder, wake.lease_until = worker, now + state.config.lease_ttl_ms

    _, state = await subs.update(sid, change)
    assert state is not None and state.wake is not None
    wake = state.wake
    return {
        "wake_id": wake.id,
        "generation": state.generation,
        "token": await subs.keys.mint(sid, state.generation, wake.id),
        "streams": stream_infos(state, wake),
        "lease_ttl_ms": state.config.lease_ttl_ms,
    }


async def finish(subs: Subscriptions, sid: str, token: str, body: Any, kind: str) -> dict[str, Any] | None:
    """A webhook callback (``kind`` "callback"), a pull-wake ack ("ack") or release
    ("release"): fenced on the token, generation and wake, then acks applied, the lease
    extended, and with ``done`` (or a release) the wake ended and the next one opened if
    work is pending. The JSON answer (None for a release: 204)."""
    claims = await subs.keys.verify(token, sid)
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    wake_id, generation, done = body.get("wake_id"), body.get("generation"), body.get("done", False)
    if not isinstance(wake_id, str) or isinstance(generation, bool) or not isinstance(generation, int):
        raise invalid("wake_id (a string) and generation (a number) are required")
    if not isinstance(done, bool):
        raise invalid("done must be true or false")
    acks = _parse_acks(body.get("acks")) if kind != "release" else []
    ack_tails = await subs.tails(sorted({path for path, _ in acks}))

    async def change(state: State | None, now: int) -> bool:
        if state is None or state.deleted:
            raise not_found()
        expected = "webhook" if kind == "callback" else "pull-wake"
        if state.config.type != expected:
            raise invalid(f"{kind} is for {expected} subscriptions")
        wake = state.wake
        current = state.generation
        if wake is None or wake.id != wake_id or claims.get("wake") != wake.id:
            raise fenced()
        if generation != current or claims.get("gen") != current:
            raise fenced()
        if wake.lease_until is not None and wake.lease_until <= now:
            raise fenced("the wake's lease has expired")
        for path, position in acks:
            link = state.links.get(path)
            if link is None:
                raise SubscriptionError(409, "INVALID_OFFSET", f"{path} is not a stream of this subscription")
            if position < link.acked:
                raise SubscriptionError(409, "INVALID_OFFSET", f"the ack for {path} is before its cursor")
            tail = ack_tails.get(path)
            if tail is None or position > tail:
                raise SubscriptionError(409, "INVALID_OFFSET", f"the ack for {path} is past its tail")
        for path, position in acks:
            state.links[path].acked = position
        wake.lease_until = now + state.config.lease_ttl_ms
        if not done and kind != "release":
            return False
        state.wake = None
        return await subs.open_wake(state, now, announce=True)

    next_wake, state = await subs.update(sid, change)
    if next_wake and state is not None:
        subs.send(state)
    return None if kind == "release" else {"ok": True, "next_wake": next_wake}


def _parse_acks(raw: Any) -> list[tuple[str, int]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > 1000:
        raise invalid("acks must be a list of at most 1000 {stream, offset} objects")
    acks = []
    for item in raw:
        if not isinstance(item, dict):
            raise invalid("each ack is an object {stream, offset}")
        path = relative_path(item.get("stream", item.get("path")), "acks[].stream")
        acks.append((path, decode(item.get("offset"))))
    return acks
