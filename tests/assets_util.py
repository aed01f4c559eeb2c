"""Shared code for the checks on the bundled observability assets (no crewai).

``promql_expressions()`` returns every PromQL expression of the dashboards and alert rules,
so that other tests (for example one that runs each against a live Prometheus) share one
list. ``metric_names()`` is a small PromQL tokenizer that finds the metric names an
expression reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COLLECTOR_DIR = ROOT / "collector"
DASHBOARD_DIR = ROOT / "dashboards"
PROMETHEUS_DIR = COLLECTOR_DIR / "prometheus"
RULE_FILES = (PROMETHEUS_DIR / "alerts.yml",)

# Metric names the assets may read: crew_otel's own instruments, as the package creates them
# (names and units from crew_otel.metrics, translated the Prometheus way), and those made by the
# Collector's span_metrics connector and the httpx instrumentation (stable and old HTTP names).
UNIT_SUFFIXES = {"s": "_seconds", "ms": "_milliseconds"}


def prometheus_names(name: str, unit: str, kind: str) -> list[str]:
    """The Prometheus series names of one OpenTelemetry instrument."""
    base = name.replace(".", "_") + UNIT_SUFFIXES.get(unit, "")
    if kind == "histogram":
        return [f"{base}_{suffix}" for suffix in ("bucket", "sum", "count")]
    return [base + "_total"] if kind == "counter" else [base]


class _RecordingMeter:
    """A real SDK meter that notes every instrument created through it (name, unit, kind)."""

    def __init__(self, meter: Any) -> None:
        self._meter = meter
        self.created: list[tuple[str, str, str]] = []

    def __getattr__(self, attr: str) -> Any:
        real = getattr(self._meter, attr)
        if not attr.startswith("create_"):
            return real

        def create(name: str, *args: Any, **kwargs: Any) -> Any:
            kind = attr.removeprefix("create_").removeprefix("observable_")
            self.created.append((name, kwargs.get("unit", ""), kind))
            return real(name, *args, **kwargs)

        return create


def crew_otel_metric_names() -> frozenset[str]:
    """The Prometheus names of every instrument crew_otel creates (read from the package)."""
    from opentelemetry.sdk.metrics import MeterProvider

    from crew_otel.metrics import CrewOtelMetrics

    provider = MeterProvider()
    try:
        meter = _RecordingMeter(provider.get_meter("assets"))
        CrewOtelMetrics(meter)
        names: list[str] = []
        for name, unit, created in meter.created:
            kind = created if created in ("histogram", "counter") else "gauge"
            names += prometheus_names(name, unit, kind)
        return frozenset(names)
    finally:
        provider.shutdown()


OTHER_HISTOGRAMS = (
    ("traces.span.metrics.duration", "ms"),  # span_metrics connector
    ("http.client.request.duration", "s"),  # httpx, stable HTTP semantic conventions
    ("http.client.duration", "ms"),  # httpx, old conventions (its default)
)
EMITTED_METRIC_NAMES = (
    crew_otel_metric_names()
    | frozenset(
        n for name, unit in OTHER_HISTOGRAMS for n in prometheus_names(name, unit, "histogram")
    )
    | frozenset(prometheus_names("traces.span.metrics.calls", "", "counter"))
)

# Values for Grafana's variables, so a dashboard query can run against Prometheus as is.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "${__rate_interval}": "5m",
    "$__interval": "1m",
    "${__interval}": "1m",
    "$__range": "1h",
    "${__range}": "1h",
}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def iter_rules() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in RULE_FILES:
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                yield path, rule


def recording_rule_names() -> frozenset[str]:
    return frozenset(rule["record"] for _, rule in iter_rules() if "record" in rule)


def substitute_grafana_variables(expr: str) -> str:
    """Replace Grafana's template variables so Prometheus can run the expression.

    Interval variables get fixed durations; any other ``$var`` / ``${var}`` (dashboard
    variables such as ``$job``, used in ``=~`` matchers) becomes ``.*``.
    """
    for var, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_:.]*\}|\$[A-Za-z_][A-Za-z0-9_]*", ".*", expr)


def promql_expressions(*, substitute: bool = True) -> list[tuple[str, str]]:
    """Every (source, expr) pair of the dashboards and the alert/recording rules.

    ``source`` names the file and the panel/target or rule. With ``substitute`` (the
    default) Grafana variables are replaced (see ``substitute_grafana_variables``), so each
    expression can be sent to Prometheus unchanged.
    """
    out: list[tuple[str, str]] = []
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if not expr:
                    continue
                source = (
                    f"{path.relative_to(ROOT)}: panel {panel.get('id')} "
                    f"{panel.get('title')!r} target {target.get('refId')}"
                )
                out.append((source, substitute_grafana_variables(expr) if substitute else expr))
    for path, rule in iter_rules():
        name = rule.get("alert") or rule.get("record")
        kind = "alert" if "alert" in rule else "record"
        out.append((f"{path.relative_to(ROOT)}: {kind} {name}", rule["expr"].strip()))
    return out


# --- a small PromQL tokenizer ----------------------------------------------------------------

_AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
        "start",
        "end",
    ]
)
_LABEL_LIST_KEYWORDS = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<braces>\{[^}]*\})
  | (?P<brackets>\[[^\]]*\])
  | (?P<number>0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<other>\S)
    """,
    re.VERBOSE,
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [
        (m.lastgroup or "", m.group(0))
        for m in _TOKEN.finditer(expr)
        if m.lastgroup not in ("string", "braces", "brackets", "number")
    ]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords or label names)."""
    tokens = _tokens(substitute_grafana_variables(expr))
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][0] if i + 1 < len(tokens) else ""
        if kind != "ident":
            i += 1
            continue
        if text in _LABEL_LIST_KEYWORDS and following == "lparen":
            # Skip the label list: by (job, le), on (), group_left (x) ...
            depth = 0
            i += 1
            while i < len(tokens):
                if tokens[i][0] == "lparen":
                    depth += 1
                elif tokens[i][0] == "rparen":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
        elif text in _KEYWORDS or text in _AGGREGATIONS or following == "lparen":
            pass  # keyword, aggregation or function call
        else:
            names.add(text)
        i += 1
    return names
