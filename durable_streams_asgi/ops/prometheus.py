"""Prometheus metrics for the hooks of :mod:`durable_streams_asgi.metrics`.

Built on ``prometheus_client``. Under several worker processes (``serve --workers N``, gunicorn)
set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the workers start, as
``prometheus_client`` documents: each process then writes its values to files there and
:func:`metrics_app` adds them up, so any worker answers for all of them. The standalone server
does this itself.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import Receive, Scope, Send

from .. import metrics

# Latency buckets (seconds) from well under a millisecond (an append on memory) to seconds.
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess_dir() -> str | None:
    """The directory of ``prometheus_client``'s multiprocess mode, when it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


# Counts are added up in plain dicts on the hot path and handed to prometheus_client in one go
# every so often (and before every scrape of this process): an increment of a prometheus_client
# metric takes a lock and costs about a microsecond, and an append would pay several.
FLUSH_SECONDS = 0.5


class PrometheusMetrics(metrics.Metrics):
    """Every hook as a Prometheus metric named ``durable_streams_*``.

    ``request_durations`` adds a histogram of how long each request that is not a live read
    took, by operation (about 2.5 microseconds per request: it is off by default, since a load
    balancer in front usually measures the same). Counters and gauges reach ``prometheus_client``
    within :data:`FLUSH_SECONDS` (at once for a scrape of the same process).
    """

    enabled = True

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, *, request_durations: bool = False) -> None:
        # Every metric is durable_streams_* in ``registry``.
        counter = functools.partial(Counter, namespace="durable_streams", registry=registry)
        gauge = functools.partial(Gauge, namespace="durable_streams", registry=registry, multiprocess_mode="livesum")
        histogram = functools.partial(Histogram, namespace="durable_streams", registry=registry, buckets=_FAST_BUCKETS)
        self.requests = counter("requests", "HTTP requests answered", ["operation", "status"])
        self.request_seconds: Histogram | None = None
        if request_durations:
            self.request_seconds = histogram(
                "request_duration_seconds",
                "Time to answer a request that is not a live read, by operation",
                ["operation"],
            )
        self.unavailable = counter("unavailable_responses", "Requests answered 503 (storage down, draining)")
        self.appended_messages = counter("appended_messages", "Messages (JSON) or chunks written to streams")
        self.appended_bytes = counter("appended_bytes", "Bytes written to streams")
        self.live_readers = gauge("live_readers", "Live reads waiting or streaming, by mode", ["mode"])
        self.wakeups = counter("live_wakeups", "Live readers woken to read again, by mode", ["mode"])
        self.delivery_seconds = histogram(
            "delivery_latency_seconds",
            "From a live reader's wake-up to its data written to the connection, by mode",
            ["mode"],
        )
        self.storage_seconds = histogram(
            "storage_round_trip_seconds",
            "Round trips to the storage server (Redis), each a pipelined batch of commands",
        )
        self.storage_commands = counter("storage_commands", "Commands sent to the storage server in those round trips")
        self.storage_errors = counter("storage_errors", "Failed storage calls, by kind (unavailable, error)", ["kind"])
        self.generations_active = gauge("generations_active", "Generations writing a stream now")
        self.generations_finished = counter("generations_finished", "Generations that ended, by outcome", ["outcome"])
        # Not yet handed to prometheus_client: (metric, label values) -> amount, and the two
        # counts every request and every append adds to, kept apart in their cheapest form
        # (an int attribute, a dict keyed by (operation, status)).
        self._pending: dict[tuple[Any, ...], float] = {}
        self._requests: dict[tuple[str, int], int] = {}
        self._messages = 0
        self._bytes = 0
        self._flush_at: asyncio.TimerHandle | None = None
        self._children: dict[tuple[Any, ...], Any] = {}
        #: The HTTP layer reads the clock for request() only when durations are recorded.
        self.timed = request_durations

    # -- the hot path: dict and attribute updates -----------------------------------------------

    def _arm(self) -> None:
        """Hand the counts over within FLUSH_SECONDS (at once without a running loop)."""
        try:
            self._flush_at = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
        except RuntimeError:  # a synchronous caller
            self.flush()

    def _add(self, key: tuple[Any, ...], amount: float = 1.0) -> None:
        pending = self._pending
        pending[key] = pending.get(key, 0.0) + amount
        if self._flush_at is None:
            self._arm()

    def request(self, operation: str, status: int, seconds: float | None) -> None:
        # Measured in the server, each microsecond here cost two or three per request (the
        # hooks run on every append, after its response): hence one dict update and nothing
        # derived (the status's text, the 503 count) until the flush.
        requests = self._requests
        key = (operation, status)
        requests[key] = requests.get(key, 0) + 1
        if self._flush_at is None:
            self._arm()
        if seconds is not None and self.request_seconds is not None:
            self._child(self.request_seconds, operation).observe(seconds)

    def appended(self, messages: int, size: int) -> None:
        self._messages += messages
        self._bytes += size
        if self._flush_at is None:
            self._arm()

    def live_reader(self, mode: str, delta: int) -> None:
        self._add((self.live_readers, mode), delta)

    def woken(self, mode: str) -> None:
        self._add((self.wakeups, mode))

    def delivered(self, mode: str, seconds: float) -> None:
        self._child(self.delivery_seconds, mode).observe(seconds)

    def storage_round_trip(self, seconds: float, commands: int) -> None:
        self.storage_seconds.observe(seconds)
        self._add((self.storage_commands,), commands)

    def storage_error(self, kind: str) -> None:
        self._add((self.storage_errors, kind))

    def generation(self, delta: int, outcome: str | None = None) -> None:
        self._add((self.generations_active,), delta)
        if outcome is not None:
            self._add((self.generations_finished, outcome))

    # -- handing over --------------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def flush(self) -> None:
        """Hand what was counted to prometheus_client (in multiprocess mode: to the files every
        worker's scrape reads)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        pending, self._pending = self._pending, {}
        requests, self._requests = self._requests, {}
        messages, size, self._messages, self._bytes = self._messages, self._bytes, 0, 0
        for (metric, *labels), amount in pending.items():
            if amount:
                self._child(metric, *labels).inc(amount)
        unavailable = 0
        for (operation, status), count in requests.items():
            self._child(self.requests, operation, str(status) if status else "none").inc(count)
            if status == 503:
                unavailable += count
        for metric, amount in (
            (self.unavailable, unavailable),
            (self.appended_messages, messages),
            (self.appended_bytes, size),
        ):
            if amount:
                metric.inc(amount)


def enable_metrics(
    registry: CollectorRegistry | None = REGISTRY, *, request_durations: bool = False
) -> PrometheusMetrics:
    """Record this process's metrics in ``registry`` (the default: ``prometheus_client``'s, so
    a host app's own ``/metrics`` shows them too). Idempotent: the first call's metrics stay."""
    if isinstance(metrics.current, PrometheusMetrics):
        return metrics.current
    installed = PrometheusMetrics(registry, request_durations=request_durations)
    metrics.install(installed)
    return installed


def exposition(registry: CollectorRegistry | None = None) -> bytes:
    """The text exposition: every worker's values in multiprocess mode, else ``registry``'s."""
    if isinstance(metrics.current, PrometheusMetrics):
        metrics.current.flush()  # this process's latest counts
    directory = multiprocess_dir()
    if registry is None and directory is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
    return generate_latest(registry if registry is not None else REGISTRY)


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app answering every GET with :func:`exposition` (mount it at ``/metrics``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await respond(send, 200, exposition(registry), CONTENT_TYPE_LATEST)

    return app


def mark_process_dead(pid: int | None = None) -> None:
    """In multiprocess mode, drop a finished worker's live gauges (live readers, generations)
    from the sums; the standalone server calls it as each worker shuts down."""
    if isinstance(metrics.current, PrometheusMetrics):
        metrics.current.flush()  # the counters' last increments (the live gauges go below)
    directory = multiprocess_dir()
    if directory is not None:
        multiprocess.mark_process_dead(pid if pid is not None else os.getpid(), directory)


async def respond(send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
