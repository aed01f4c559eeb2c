"""Metric data points, as the in-memory reader collects them."""

from __future__ import annotations

from collections import defaultdict

from opentelemetry.sdk.metrics.export import InMemoryMetricReader


def points(reader: InMemoryMetricReader) -> dict[str, list]:
    """Data points by crew_otel instrument name (one collection)."""
    data = reader.get_metrics_data()
    found: dict[str, list] = defaultdict(list)
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            if scope.scope.name != "crew_otel":
                continue
            for metric in scope.metrics:
                found[metric.name].extend(metric.data.data_points)
    return found


def total(points_: list, **attributes: str) -> float:
    """Sum of counter values / histogram counts over points matching the attributes."""
    value = 0.0
    for point in points_:
        if all(point.attributes.get(k.replace("__", ".")) == v for k, v in attributes.items()):
            value += getattr(point, "count", None) or getattr(point, "value", 0)
    return value
