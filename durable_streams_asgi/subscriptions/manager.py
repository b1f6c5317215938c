"""Subscriptions over one storage: the API's operations and the wakes' state machine.

Every subscription is one record in the storage (see :class:`~.model.State`), changed only by
compare-and-set, so any number of processes on any number of hosts change it safely and agree on
it: the process whose write opens a wake is the one that sends it, a process that dies while
sending is replaced once its claim on the send runs out, and fences (``generation``, ``wake_id``)
refuse whatever a stale worker or callback says. Pub/sub is not involved: a wake starts from this
process's own appends (the storage's append observer), and :mod:`.scheduler` catches the rest
(appends whose process died first, expired leases, webhook retries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

from ..aio import cancel_and_wait
from ..globs import PathGlob
from ..storage.base import RecordConflict, Storage, StorageError, StreamGone, StreamNotFound
from .keys import Keys
from .model import (
    Config,
    State,
    SubscriptionError,
    Wake,
    check_id,
    invalid,
    is_reserved,
    link_hinted,
    not_found,
    parse_config,
)
from .outbound import WebhookClient, WebhookURLRejected, parse_webhook_url, resolve_webhook_target

logger = logging.getLogger("durable_streams_asgi.subscriptions")

SPACE = "__ds:subscriptions"
INDEX_SPACE, INDEX_KEY = "__ds", "subscription-index"
#: How long a process's claim to send a wake lasts (ms) before another may take over: past the
#: webhook client's whole timeout, so two processes never send one wake at once.
SEND_CLAIM_MS = 20_000
RESCAN_AFTER = 1.5  # seconds: every process has picked up a new pattern by then (see _rescan)

T = TypeVar("T")


class Unchanged(Exception):
    """Raised by a change to :meth:`Subscriptions.update` that has nothing to write."""


def _scan_prefix(pattern: str) -> str:
    """The literal beginning of a pattern's paths: what a stream scan can narrow to."""
    glob = "/" + pattern
    star = glob.find("*")
    if star < 0:
        return glob
    prefix = glob[:star]
    # "a/**" matches "/a" itself: the scan must not require the slash.
    return prefix[:-1] if glob.startswith("**", star) and prefix.endswith("/") and len(prefix) > 1 else prefix


def _now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class Subscriptions:
    """Subscriptions (PROTOCOL.md sections 6 and 7) over ``storage``, shared with every process
    that uses the same storage. ``allow_loopback_webhooks`` lets webhooks go to loopback
    addresses over http (development and tests only: in production a webhook URL must be
    https to a public address)."""

    def __init__(
        self,
        storage: Storage,
        *,
        allow_loopback_webhooks: bool = False,
        max_deliveries: int = 16,
        webhook_timeout: float = 10.0,
    ) -> None:
        self.storage = storage
        self.keys = Keys(storage)
        self.allow_loopback = allow_loopback_webhooks
        self.client = WebhookClient(allow_loopback=allow_loopback_webhooks, timeout=webhook_timeout)
        self.process = uuid.uuid4().hex[:16]
        # What this process matches its appends against: (id, pattern, explicit paths, its own
        # wake stream, which never wakes it: its wake events would wake it again, forever).
        self.index: list[tuple[str, PathGlob | None, frozenset[str], str | None]] = []
        self.index_version = -1
        self._hints: dict[str, dict[str, int]] = {}  # id -> {path: position before the append}
        self._applying: dict[str, list[dict[str, int]]] = {}  # hints being written by evaluations
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deliveries = asyncio.Semaphore(max_deliveries)
        self._stop_observing: Callable[[], None] | None = None
        self._scheduler: Any = None
        self.started = False
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Observe this process's appends and run the scheduler (idempotent; needs a running loop)."""
        if self.started or self.closed:
            return
        from .scheduler import Scheduler  # the scheduler drives this class: imported late, no cycle

        self.started = True
        self._stop_observing = self.storage.observe_appends(self._observed)
        self._scheduler = Scheduler(self)
        self._scheduler.start()

    async def aclose(self) -> None:
        self.closed = True
        if self._stop_observing is not None:
            self._stop_observing()
        if self._scheduler is not None:
            await self._scheduler.aclose()
        await cancel_and_wait(list(self._tasks))
        await self.client.aclose()

    def spawn(self, work: Awaitable[Any], what: str) -> None:
        """Run ``work`` in the background, logging (not raising) what goes wrong."""
        if self.closed:
            if asyncio.iscoroutine(work):
                work.close()
            return

        async def run() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except SubscriptionError:
                pass  # the subscription changed under us (deleted, fenced): nothing to do
            except Exception as exc:
                logger.warning("subscriptions: %s failed: %s", what, exc, exc_info=not isinstance(exc, StorageError))

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- records ---------------------------------------------------------------------------------

    async def load(self, sid: str) -> State | None:
        record = await self.storage.get_record(SPACE, sid)
        return None if record is None else State.decode(record.value)

    async def update(self, sid: str, change: Callable[[State | None, int], Awaitable[T]]) -> tuple[T, State | None]:
        """Apply ``change(state, now_ms)`` (it edits the state in place, or returns without
        writing by raising) with compare-and-set, retried on conflict: its result and the state
        written. ``change`` gets None when there is no record; it may then not write."""
        for _ in range(50):
            record = await self.storage.get_record(SPACE, sid)
            state = None if record is None else State.decode(record.value)
            now = record.now_ms if record is not None else int(time.time() * 1000)
            try:
                result = await change(state, now)
            except Unchanged:
                return None, state  # type: ignore[return-value]
            if state is None:
                return result, state
            encoded = state.encode()
            if record is not None and encoded == record.value:
                return result, state  # nothing changed: no write
            try:
                await self.storage.put_record(SPACE, sid, encoded, record.version if record else 0)
            except RecordConflict:
                continue
            return result, state
        raise SubscriptionError(503, "BUSY", "the subscription is changing too fast; retry")

    async def tails(self, paths: list[str]) -> dict[str, int | None]:
        """The tails of relative paths (None: the stream is gone), read concurrently."""

        async def tail(path: str) -> int | None:
            try:
                return (await self.storage.head("/" + path)).tail
            except (StreamNotFound, StreamGone):
                return None

        return dict(zip(paths, await asyncio.gather(*(tail(p) for p in paths)), strict=True))

    async def _publish_index(self) -> None:
        """Rewrite the index record (patterns and explicit paths of every live subscription),
        which every process polls to know which of its appends to look at."""
        _, records = await self.storage.list_records(SPACE)
        subs: dict[str, Any] = {}
        for record in records:
            state = State.decode(record.value)
            if not state.deleted:
                explicit = sorted(p for p, link in state.links.items() if link.explicit)
                subs[state.id] = {"p": state.config.pattern, "s": explicit, "w": state.config.wake_stream}
        value = json.dumps({"subs": subs}, sort_keys=True, separators=(",", ":")).encode()
        for _ in range(50):
            current = await self.storage.get_record(INDEX_SPACE, INDEX_KEY)
            if current is not None and current.value == value:
                break
            try:
                written = await self.storage.put_record(
                    INDEX_SPACE, INDEX_KEY, value, current.version if current else 0
                )
            except RecordConflict:
                continue
            self.load_index(written.version, value)
            break

    def load_index(self, version: int, value: bytes) -> None:
        subs = json.loads(value)["subs"]
        self.index = [
            (sid, None if entry["p"] is None else PathGlob("/" + entry["p"]), frozenset(entry["s"]), entry["w"])
            for sid, entry in subs.items()
        ]
        self.index_version = version

    # -- the API: create, read, delete, membership -------------------------------------------------

    async def put(self, sid: str, config: Config, base_url: str) -> tuple[bool, State]:
        """Create the subscription, or confirm an identical one: ``(created, state)``; 409 for
        another configuration under the id, 400 ``WEBHOOK_URL_REJECTED`` for a URL not called."""
        if config.webhook_url is not None:
            await self.check_url(config.webhook_url)
        fresh = State(sid, config, _now_iso(), base_url)
        tails = await self.tails(list(config.streams))
        for path in config.streams:
            fresh.link(path, tails[path] or 0, explicit=True)
        if config.pattern is not None:
            await self._discover(fresh, glob_at_tail=True)
        while True:
            record = await self.storage.get_record(SPACE, sid)
            if record is not None:
                existing = State.decode(record.value)
                if not existing.deleted:
                    if existing.config.digest() != config.digest():
                        raise SubscriptionError(
                            409, "SUBSCRIPTION_ALREADY_EXISTS", "a subscription with another configuration has this id"
                        )
                    return False, existing
            try:
                await self.storage.put_record(SPACE, sid, fresh.encode(), record.version if record else 0)
            except RecordConflict:
                continue
            break
        await self._publish_index()
        if config.pattern is not None:
            self.spawn(self._rescan(sid), f"rescan of {sid}")
        self.spawn(self.evaluate(sid), f"first wake of {sid}")
        return True, fresh

    async def create(self, sid: str, config: dict[str, Any], *, base_url: str) -> dict[str, Any]:
        """The in-process ``PUT``: create (or confirm) the subscription ``sid`` from a config as
        the HTTP API takes it; what a ``GET`` would show. ``base_url`` is the streams' root URL
        as webhook receivers reach it (``https://api.example.com/v1/stream``): callback URLs are
        built from it. Raises :class:`SubscriptionError` (``status``, ``code``) for a bad config."""
        base = base_url.rstrip("/")
        _, state = await self.put(check_id(sid), parse_config(config), base)
        return await self.view(state, base)

    async def check_url(self, url: str) -> None:
        try:
            target = parse_webhook_url(url, allow_loopback=self.allow_loopback)
            await resolve_webhook_target(target, allow_loopback=self.allow_loopback)
        except WebhookURLRejected as exc:
            raise SubscriptionError(400, "WEBHOOK_URL_REJECTED", str(exc)) from None

    async def get(self, sid: str) -> State:
        state = await self.load(sid)
        if state is None or state.deleted:
            raise not_found()
        return state

    async def delete(self, sid: str) -> None:
        """Tombstone it: in-flight callbacks, acks and releases then fail, moving nothing."""

        async def change(state: State | None, now: int) -> None:
            if state is None or state.deleted:
                raise not_found()
            state.deleted, state.wake, state.links = True, None, {}

        await self.update(sid, change)
        await self._publish_index()

    async def add_streams(self, sid: str, paths: list[str]) -> None:
        tails = await self.tails(paths)

        async def change(state: State | None, now: int) -> None:
            if state is None or state.deleted:
                raise not_found()
            if state.config.wake_stream in paths:
                raise invalid("a subscription's wake stream cannot be one of its streams")
            for path in paths:
                state.link(path, tails[path] or 0, explicit=True)

        await self.update(sid, change)
        await self._publish_index()
        self.spawn(self.evaluate(sid), f"wake of {sid}")

    async def remove_stream(self, sid: str, path: str) -> None:
        async def change(state: State | None, now: int) -> None:
            if state is None or state.deleted:
                raise not_found()
            link = state.links.get(path)
            if link is None or not link.explicit:
                return
            glob = state.config.glob()
            link.explicit = False
            link.glob = link.glob or (glob is not None and glob.match("/" + path))
            if not link.glob:
                del state.links[path]

        await self.update(sid, change)
        await self._publish_index()

    async def _discover(self, state: State, *, glob_at_tail: bool) -> bool:
        """Link the streams matching the pattern that are not linked yet: at their tail when the
        subscription is new (no history replayed), else at their start (streams created since,
        whose first append a process missed). Whether any was linked."""
        glob = state.config.glob()
        if glob is None:
            return False
        found: list[str] = []
        cursor = ""
        while True:
            page, cursor = await self.storage.scan_streams(_scan_prefix(state.config.pattern or ""), cursor)
            found += [
                p[1:]
                for p in page
                if glob.match(p)
                and not is_reserved(p)
                and p[1:] not in state.links
                and p[1:] != state.config.wake_stream
            ]
            if not cursor:
                break
        tails = await self.tails(found) if glob_at_tail else {}
        linked = False
        for path in found:
            if glob_at_tail and tails[path] is None:
                continue
            state.link(path, (tails[path] or 0) if glob_at_tail else 0, glob=True)
            linked = True
        return linked

    async def _rescan(self, sid: str) -> None:
        """Once every process has the new pattern in its index, link the matching streams made
        meanwhile (their appends went to processes that did not know of it yet)."""
        await asyncio.sleep(RESCAN_AFTER)

        async def change(state: State | None, now: int) -> None:
            if state is None or state.deleted or not await self._discover(state, glob_at_tail=False):
                raise Unchanged

        await self.update(sid, change)
        await self.evaluate(sid)

    # -- appends to wakes ------------------------------------------------------------------------

    def _observed(self, path: str, start: int, end: int) -> None:
        """The storage's append observer: note the subscriptions this append may wake."""
        if not self.index or is_reserved(path):
            return
        relative = path[1:]
        for sid, glob, explicit, wake_stream in self.index:
            if relative != wake_stream and (relative in explicit or (glob is not None and glob.match(path))):
                hints = self._hints.get(sid)
                if hints is None:
                    self._hints[sid] = {relative: start}
                    self.spawn(self._evaluate_hinted(sid), f"wake of {sid}")
                elif start < hints.get(relative, start + 1):
                    hints[relative] = start

    async def _evaluate_hinted(self, sid: str) -> None:
        await asyncio.sleep(0)  # appends of the same tick are looked at together
        hints = self._hints.pop(sid, {})
        applying = self._applying.setdefault(sid, [])
        applying.append(hints)  # until written, a claim must see them (see claim)
        try:
            await self.evaluate(sid, hints)
        finally:
            applying.remove(hints)
            if not applying:
                self._applying.pop(sid, None)

    async def evaluate(self, sid: str, hints: dict[str, int] | None = None) -> None:
        """Link the hinted streams (at the position before their append) and open a wake if
        there is pending work and none is in flight; then send it."""

        async def change(state: State | None, now: int) -> bool:
            if state is None or state.deleted:
                raise not_found()
            link_hinted(state, hints or {})
            if state.wake is not None:
                return False
            return await self.open_wake(state, now, announce=True)

        opened, state = await self.update(sid, change)
        if opened and state is not None:
            self.send(state)

    async def open_wake(self, state: State, now: int, *, announce: bool) -> bool:
        """Open a new wake (the next generation) if a linked stream has data past its cursor;
        this process then sends it (``announce``: a pull-wake's event, a webhook's POST)."""
        paths = list(state.links)
        found = await self.tails(paths)
        tails: dict[str, int] = {}
        for path in paths:
            tail = found[path]
            if tail is not None:
                if tail < state.links[path].acked:
                    state.links[path].acked = 0  # deleted and made again: its positions restarted
                tails[path] = tail
            elif state.links[path].explicit:
                # Not there (yet, or any more): a stream made at the path later starts at 0.
                state.links[path].acked = 0
            else:
                del state.links[path]  # a glob link to a stream that is gone; a new one relinks
        if not any(tail > state.links[path].acked for path, tail in tails.items()):
            return False
        state.generation += 1
        wake = Wake("w_" + secrets.token_hex(8), tails)
        if announce and (state.config.type == "pull-wake" or state.next_attempt_at <= now):
            wake.sender, wake.send_until = self.process, now + SEND_CLAIM_MS
        state.wake = wake
        return True

    def send(self, state: State) -> None:
        """Send the state's wake if this process holds the claim to send it."""
        wake = state.wake
        if wake is None or wake.sender != self.process or wake.sent:
            return
        from .delivery import announce, deliver  # late: delivery needs this module

        if state.config.type == "webhook":
            self.spawn(deliver(self, state.id, wake.id), f"webhook of {state.id}")
        else:
            self.spawn(announce(self, state.id, wake.id), f"wake event of {state.id}")

    # -- workers: claim, ack, release, callback (see .workers) ------------------------------------

    async def claim(self, sid: str, worker: str) -> dict[str, Any]:
        """A pull-wake worker's claim: the wake, its token and streams; 409 when another holds it."""
        from .workers import claim

        return await claim(self, sid, worker)

    async def finish(self, sid: str, token: str, body: Any, kind: str) -> dict[str, Any] | None:
        """A webhook callback (``kind`` "callback"), or a pull-wake ack or release (see .workers)."""
        from .workers import finish

        return await finish(self, sid, token, body, kind)

    # -- what the API shows ----------------------------------------------------------------------

    def callback_url(self, state: State) -> str:
        return f"{state.base_url}/__ds/subscriptions/{quote(state.id, safe='')}/callback"

    async def view(self, state: State, root_url: str) -> dict[str, Any]:
        config = state.config
        webhook = None
        if config.webhook_url is not None:
            kid = (await self.keys.signing_key()).kid
            signing = {"alg": "ed25519", "kid": kid, "jwks_url": f"{root_url}/__ds/jwks.json"}
            webhook = {"url": config.webhook_url, "signing": signing}
        return {
            "id": state.id,
            "subscription_id": state.id,
            "type": config.type,
            "pattern": config.pattern,
            "streams": state.stream_list(),
            "webhook": webhook,
            "wake_stream": config.wake_stream,
            "lease_ttl_ms": config.lease_ttl_ms,
            "created_at": state.created_at,
            "status": state.status,
            "description": config.description,
        }
