"""PromQL for the dashboards: metric and label names from crew_otel's own constants.

Metric names are the OpenTelemetry instrument names of :mod:`crew_otel.metrics` after the
standard Prometheus translation (the Collector's ``UnderscoreEscapingWithSuffixes``, and the
Python SDK's Prometheus reader): ``.`` becomes ``_``, the unit adds ``_seconds`` /
``_milliseconds`` (annotation units such as ``{retry}`` add nothing) and counters end in
``_total``. Label names are the attribute keys of :mod:`crew_otel.attributes`, translated the
same way. Renaming a constant therefore changes the dashboards, and the asset tests compare
both with what the package and the Collector emit.

Every selector filters on the dashboard's ``$job`` variable (the services selected).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from crew_otel import attributes as a
from crew_otel import metrics as m

RATE = "$__rate_interval"
RANGE = "$__range"
JOB_MATCHER = 'job=~"$job"'

_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds"}


def prometheus_name(otel_name: str, unit: str = "", *, counter: bool = False) -> str:
    """The Prometheus name of an OpenTelemetry instrument (``crew_otel.retries`` ->
    ``crew_otel_retries_total``)."""
    name = otel_name.replace(".", "_")
    suffix = _UNIT_SUFFIX.get(unit, "")
    if suffix and not name.endswith("_" + suffix):
        name += "_" + suffix
    return name + "_total" if counter else name


def label(attribute: str) -> str:
    """The Prometheus label name of a metric attribute (``error.type`` -> ``error_type``)."""
    return attribute.replace(".", "_")


@dataclass(frozen=True)
class Histogram:
    """A histogram's series: ``<name>_bucket``, ``<name>_sum`` and ``<name>_count``."""

    name: str

    @property
    def bucket(self) -> str:
        return self.name + "_bucket"

    @property
    def sum(self) -> str:
        return self.name + "_sum"

    @property
    def count(self) -> str:
        return self.name + "_count"


# --- crew_otel's instruments (crew_otel/metrics.py) --------------------------------------------

OPERATION_DURATION = Histogram(prometheus_name(m.OPERATION_DURATION, "s"))
TOKEN_USAGE = Histogram(prometheus_name(m.TOKEN_USAGE, "{token}"))
WORKFLOW_DURATION = Histogram(prometheus_name(m.WORKFLOW_DURATION, "s"))
AGENT_DURATION = Histogram(prometheus_name(m.AGENT_DURATION, "s"))
TOOL_DURATION = Histogram(prometheus_name(m.TOOL_DURATION, "s"))
QUEUE_WAIT = Histogram(prometheus_name(m.KICKOFF_QUEUE_WAIT, "s"))
KICKOFFS_ACTIVE = prometheus_name(m.KICKOFFS_ACTIVE, "{kickoff}")  # an up-down counter: gauge
RETRIES = prometheus_name(m.RETRIES, "{retry}", counter=True)
ERROR_ORIGINS = prometheus_name(m.ERROR_ORIGINS, "{error}", counter=True)
SHARED_CONFLICTS = prometheus_name(m.SHARED_INSTANCE_CONFLICTS, "{conflict}", counter=True)
CROSSTALK = prometheus_name(m.CROSSTALK, "{run}", counter=True)
FAILURES = prometheus_name(m.FAILURES, "{run}", counter=True)

# --- the Collector's span_metrics connector (collector/*.yaml: namespace traces.span.metrics,
# histogram unit ms) --------------------------------------------------------------------------

SPAN_METRICS_NAMESPACE = "traces.span.metrics"
SPAN_CALLS = prometheus_name(SPAN_METRICS_NAMESPACE + ".calls", counter=True)
SPAN_DURATION = Histogram(prometheus_name(SPAN_METRICS_NAMESPACE + ".duration", "ms"))
SPAN_NAME = "span_name"

# --- the httpx instrumentation (opentelemetry-instrumentation-httpx) ----------------------------
# Stable HTTP semantic conventions (OTEL_SEMCONV_STABILITY_OPT_IN=http or http/dup) ...
HTTP_DURATION = Histogram(prometheus_name("http.client.request.duration", "s"))
HTTP_SERVER_ADDRESS = label("server.address")
HTTP_STATUS = label(a.HTTP_STATUS_CODE)
# ... and the instrumentation's default, the old conventions: milliseconds, http.status_code,
# no host attribute on the metric.
HTTP_DURATION_OLD = Histogram(prometheus_name("http.client.duration", "ms"))
HTTP_STATUS_OLD = label(a.HTTP_STATUS_CODE_OLD)

# --- labels ------------------------------------------------------------------------------------

JOB = "job"  # service.name
INSTANCE = "instance"  # service.instance.id
LE = "le"
WORKFLOW = label(a.GEN_AI_WORKFLOW_NAME)
AGENT = label(a.GEN_AI_AGENT_NAME)
TOOL = label(a.GEN_AI_TOOL_NAME)
PROVIDER = label(a.GEN_AI_PROVIDER_NAME)
MODEL = label(a.GEN_AI_REQUEST_MODEL)
TOKEN_TYPE = label(a.GEN_AI_TOKEN_TYPE)
ERROR_TYPE = label(a.ERROR_TYPE)
RETRY_LAYER = label(a.RETRY_LAYER)
ORIGIN_OPERATION = label(a.ORIGIN_OPERATION)
ERROR_RECOVERED = label(a.ERROR_RECOVERED)
ERROR_ORIGIN = label(a.ERROR_ORIGIN)
SHARED_KIND = label(a.SHARED_INSTANCE_KIND)
CROSSTALK_SOURCE = label(a.CROSSTALK_SOURCE)
FAILURE_CAUSE = label(a.FAILURE_CAUSE)

# --- matchers ----------------------------------------------------------------------------------

#: Series of failed operations: their spans have an error status, so tail sampling keeps their
#: traces (the ``keep-errors`` policy) and their exemplars open a trace that exists.
FAILED = f'{ERROR_TYPE}!=""'
ORIGIN_TRUE = f'{ERROR_ORIGIN}="true"'
NOT_AGENT_RETRY = f'{RETRY_LAYER}!="{a.RETRY_LAYER_AGENT}"'
INPUT_TOKENS = f'{TOKEN_TYPE}="input"'


def eq(name: str, value: str) -> str:
    """``name="value"``."""
    return f'{name}="{value}"'


def by(*labels: str) -> str:
    """``job, label...``: the grouping of a panel query (``job`` first, always)."""
    return ", ".join((JOB, *labels))


def legend(*labels: str) -> str:
    """``{{job}} {{label}}...``."""
    return " ".join("{{" + name + "}}" for name in (JOB, *labels))


def sel(metric: str, *matchers: str) -> str:
    """``metric{job=~"$job", matchers...}``."""
    return metric + "{" + ", ".join((JOB_MATCHER, *matchers)) + "}"


def rate(metric: str, *matchers: str) -> str:
    """``rate(metric{...}[$__rate_interval])``."""
    return f"rate({sel(metric, *matchers)}[{RATE}])"


def increase(metric: str, *matchers: str, window: str = RANGE) -> str:
    """``increase(metric{...}[window])`` (the dashboard's time range by default)."""
    return f"increase({sel(metric, *matchers)}[{window}])"


def sum_by(labels: str | Iterable[str], expr: str) -> str:
    """``sum by (labels) (expr)``."""
    grouping = labels if isinstance(labels, str) else ", ".join(labels)
    return f"sum by ({grouping}) ({expr})"


def quantile(q: float, histogram: Histogram, labels: str, *matchers: str) -> str:
    """``histogram_quantile(q, sum by (labels, le) (rate(<histogram>_bucket{...})))``."""
    buckets = sum_by(f"{labels}, {LE}", rate(histogram.bucket, *matchers))
    return f"histogram_quantile({q}, {buckets})"


def ratio(numerator: str, denominator: str) -> str:
    """``numerator / denominator``."""
    return f"{numerator} / {denominator}"


def http_attempts(labels: str) -> str:
    """HTTP attempts per second from the httpx instrumentation, whichever conventions it uses.

    The stable metric counts as is. The old one (the instrumentation's default) counts only
    for processes that do not also send the stable one (``http/dup``), with its status code
    renamed to the stable label, so one query serves both and nothing counts twice.
    """
    new = rate(HTTP_DURATION.count)
    old_only = f"{rate(HTTP_DURATION_OLD.count)} unless on ({JOB}, {INSTANCE}) {new}"
    old = f'label_replace({old_only}, "{HTTP_STATUS}", "$1", "{HTTP_STATUS_OLD}", "(.+)")'
    return sum_by(labels, f"{new} or {old}")
