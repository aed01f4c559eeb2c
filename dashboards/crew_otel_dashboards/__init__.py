"""The crew_otel Grafana dashboards as code: one module per dashboard.

``promql`` builds the queries from crew_otel's metric and attribute constants, ``grafana``
holds the shared panels, variables and Jaeger links. ``dashboards/generate.py`` renders
:data:`DASHBOARDS` to the JSON files next to it.
"""

from __future__ import annotations

from collections.abc import Callable

from grafana_foundation_sdk.builders import dashboard as db

from . import error_origins, latency, overlap, retries, shared_instances

#: File name -> builder of the dashboard.
DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "crew-otel-overlap.json": overlap.build,
    "crew-otel-retries.json": retries.build,
    "crew-otel-error-origins.json": error_origins.build,
    "crew-otel-latency.json": latency.build,
    "crew-otel-shared-instances.json": shared_instances.build,
}
