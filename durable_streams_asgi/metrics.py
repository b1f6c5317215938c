"""The points operators measure, as hooks that do nothing until metrics are enabled.

The server calls :data:`current` at each point (a request answered, messages appended, a live
reader parked or woken, a storage round trip, a generation's end). By default it is a
:class:`Metrics` whose methods do nothing, so the library costs nothing for metrics nobody reads
and needs no metrics library. :func:`durable_streams_asgi.ops.enable_metrics` installs the
Prometheus implementation (``prometheus_client``, multiprocess mode included).

Metrics are per process, as ``prometheus_client``'s registry is: one installed set serves every
``DurableStreams`` in the process.
"""

from __future__ import annotations


class Metrics:
    """The hooks, all no-ops. Subclasses override what they record; ``enabled`` says whether
    the HTTP layer should time and classify requests at all (a little work per request)."""

    enabled = False
    #: Whether :meth:`request` wants durations: the HTTP layer reads the clock around a request
    #: only then, and passes None otherwise.
    timed = True

    def request(self, operation: str, status: int, seconds: float | None) -> None:
        """An HTTP request was answered. ``operation`` is one of ``create``, ``append``,
        ``close``, ``read``, ``long_poll``, ``sse``, ``head``, ``delete``, ``preflight``;
        ``seconds`` is None for live reads (their duration is the wait, not the work)."""

    def appended(self, messages: int, size: int) -> None:
        """``messages`` entries of ``size`` bytes in all were written to a stream (by any
        writer: HTTP, in-process or a generation)."""

    def live_reader(self, mode: str, delta: int) -> None:
        """A live reader (``long_poll`` or ``sse``) started (+1) or ended (-1) waiting."""

    def woken(self, mode: str) -> None:
        """A waiting live reader was woken by a change (or a reconnect) and reads again."""

    def delivered(self, mode: str, seconds: float) -> None:
        """A woken live reader had its data written ``seconds`` after its wake-up arrived."""

    def storage_round_trip(self, seconds: float, commands: int) -> None:
        """One round trip to the storage server (Redis) carrying ``commands`` commands."""

    def storage_error(self, kind: str) -> None:
        """A storage call failed: ``unavailable`` (connection, timeout, loading, failover) or
        ``error`` (any other error reply)."""

    def generation(self, delta: int, outcome: str | None = None) -> None:
        """A generation started (+1) or ended (-1, with its outcome)."""


#: The installed hooks (see :func:`install`).
current: Metrics = Metrics()


def install(metrics: Metrics) -> Metrics:
    """Make ``metrics`` the hooks the whole process reports to; returns the previous ones."""
    global current
    previous, current = current, metrics
    return previous
