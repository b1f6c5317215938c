"""What operators need around the streams: health checks, Prometheus metrics, log formats.

    from durable_streams_asgi.ops import enable_metrics, ops_app

    enable_metrics()                          # record metrics (process-wide)
    app.mount("/ops", ops_app(streams))       # /ops/healthz, /ops/readyz, /ops/metrics

The standalone server serves the same endpoints at ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

from .health import ops_app, readiness
from .prometheus import PrometheusMetrics, enable_metrics, exposition, mark_process_dead, metrics_app

__all__ = [
    "PrometheusMetrics",
    "enable_metrics",
    "exposition",
    "mark_process_dead",
    "metrics_app",
    "ops_app",
    "readiness",
]
