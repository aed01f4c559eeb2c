"""Grafana building blocks shared by the dashboards: panels, variables and links to Jaeger.

Every panel queries the Prometheus data source picked by the ``${datasource}`` variable.
Data links name the series' service differently per frame shape: a time series frame (time
series panels, and stat panels, whose instant queries return one series per service) has the
labels on its value field, ``${__field.labels.job}``; a table frame has one column per label,
``${__data.fields.job}`` (``__field.labels`` is empty there).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from crew_otel import attributes as a

from . import promql as q

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
JAEGER_DATASOURCE_UID = "jaeger"
TAGS = ["crew_otel", "crewai", "opentelemetry"]
JAEGER_MONITOR_TITLE = "Jaeger Monitor (span kind: Internal or Client)"
JAEGER_MONITOR_TOOLTIP = (
    "Jaeger's Monitor tab shows Server spans until you pick another span kind: choose Internal "
    "(kickoffs, tasks, agents, steps, tools) or Client (model calls, HTTP attempts)."
)


class Frame(Enum):
    """The shape of the data a panel's links are evaluated on."""

    SERIES = "series"  # time series and stat panels
    TABLE = "table"  # table panels (instant queries in table format)


def series_value(label: str, frame: Frame) -> str:
    """The Grafana variable holding the clicked series' ``label``."""
    if frame is Frame.TABLE:
        return "${__data.fields." + label + "}"
    return "${__field.labels." + label + "}"


# --- links to Jaeger ---------------------------------------------------------------------------

GRAFANA_VAR = re.compile(r"\$\{[^}]+\}")


def encode(text: str) -> str:
    """Percent-encode ``text`` for a URL, keeping Grafana ``${...}`` variables.

    Variables without a format get ``:percentencode``, so Grafana encodes their values.
    """
    out = []
    pos = 0
    for match in GRAFANA_VAR.finditer(text):
        out.append(urllib.parse.quote(text[pos : match.start()], safe=""))
        var = match.group(0)
        out.append(var if ":" in var else var[:-1] + ":percentencode}")
        pos = match.end()
    out.append(urllib.parse.quote(text[pos:], safe=""))
    return "".join(out)


@dataclass(frozen=True)
class TraceSearch:
    """A Jaeger search for the clicked series' service (``job``) and span tags.

    ``tags`` are literal values (or dashboard variables); ``label_tags`` map a span tag to the
    series label holding its value; ``operation`` is a span-name prefix followed by a label.
    """

    what: str
    tags: Mapping[str, str] = field(default_factory=dict)
    label_tags: Mapping[str, str] = field(default_factory=dict)
    operation: tuple[str, str] | None = None

    def resolved_tags(self, frame: Frame) -> dict[str, str]:
        resolved = dict(self.tags)
        resolved.update({k: series_value(v, frame) for k, v in self.label_tags.items()})
        return resolved

    def ui_link(self, frame: Frame) -> db.DashboardLink:
        """A data link to the Jaeger UI search page."""
        params = [("service", series_value(q.JOB, frame))]
        if self.operation:
            prefix, name_label = self.operation
            params.append(("operation", a.span_name(prefix, series_value(name_label, frame))))
        tags = self.resolved_tags(frame)
        if tags:
            params.append(("tags", json.dumps(tags, separators=(",", ":"))))
        url = "${jaeger_url}/search?" + "&".join(f"{k}={encode(v)}" for k, v in params)
        url += "&start=${__from}000&end=${__to}000&lookback=custom&limit=50"
        return db.DashboardLink(f"Jaeger: {self.what}").url(url).target_blank(True)

    def explore_link(self, frame: Frame) -> db.DashboardLink:
        """A data link to Grafana Explore, searching the Jaeger data source."""
        panes = {
            "crew": {
                "datasource": JAEGER_DATASOURCE_UID,
                "queries": [
                    {
                        "refId": "A",
                        "datasource": {"type": "jaeger", "uid": JAEGER_DATASOURCE_UID},
                        "queryType": "search",
                        "service": series_value(q.JOB, frame),
                        "tags": " ".join(f"{k}={v}" for k, v in self.resolved_tags(frame).items()),
                        "limit": 50,
                    }
                ],
                "range": {"from": "${__from}", "to": "${__to}"},
            }
        }
        url = "/explore?schemaVersion=1&orgId=1&panes=" + encode(
            json.dumps(panes, separators=(",", ":"))
        )
        return db.DashboardLink(f"Explore traces: {self.what}").url(url).target_blank(True)

    def links(self, frame: Frame, *, explore: bool = True) -> list[db.DashboardLink]:
        links = [self.ui_link(frame)]
        if explore:
            links.append(self.explore_link(frame))
        return links


TRUE = "true"
ORIGINS_OF_SERIES = TraceSearch(
    "error origins of this series",
    {a.ERROR_ORIGIN: TRUE},
    {a.ERROR_TYPE: q.ERROR_TYPE},
)
ANY_ORIGIN = TraceSearch("error origins", {a.ERROR_ORIGIN: TRUE})
FATAL = TraceSearch("unrecovered error origins", {a.ERROR_ORIGIN: TRUE, a.ERROR_RECOVERED: "false"})
RECOVERED = TraceSearch("retried (recovered) errors", {a.ERROR_RECOVERED: TRUE})
SHARED = TraceSearch("shared-instance conflicts", {a.SHARED_INSTANCE: TRUE})
CROSSTALK = TraceSearch("runs carrying another request's data", {a.CROSSTALK: TRUE})
FAILURE_CAUSE = TraceSearch(
    "failed runs of this cause", label_tags={a.FAILURE_CAUSE: q.FAILURE_CAUSE}
)
REQUEST = TraceSearch("traces of request ${request_id}", {a.REQUEST_ID: "${request_id}"})


def links(frame: Frame, *searches: TraceSearch) -> list[db.DashboardLink]:
    """The UI and Explore links of each search, for panels of this frame shape."""
    return [link for search in searches for link in search.links(frame)]


# --- panels ------------------------------------------------------------------------------------


def query(
    expr: str, legend: str = "", ref_id: str = "A", *, exemplar: bool = False
) -> prometheus.Dataquery:
    """A range query. ``exemplar`` only where the exemplars' traces survive tail sampling."""
    target = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    if exemplar:
        target = target.exemplar(True)
    return target.range()


def instant(expr: str, legend: str = "", *, table_format: bool) -> prometheus.Dataquery:
    """An instant query: a table (one row per series) or one series per stat."""
    target = prometheus.Dataquery().expr(expr).ref_id("A").datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    fmt = PromQueryFormat.TABLE if table_format else PromQueryFormat.TIME_SERIES
    return target.instant().format(fmt)


def legend_table() -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .display_mode(cm.LegendDisplayMode.TABLE)
        .placement(cm.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["mean", "max", "lastNotNull"])
    )


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


class Ids:
    """Sequential panel ids, unique within a dashboard."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def row(ids: Ids, title: str) -> db.Row:
    return db.Row(title).id(ids())


def ts(
    ids: Ids,
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    unit: str,
    *,
    searches: tuple[TraceSearch, ...] = (),
    span: int = 12,
    height: int = 8,
    bars: bool = False,
) -> timeseries.Panel:
    """A time series panel; ``searches`` become data links on each series."""
    panel = (
        timeseries.Panel()
        .id(ids())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(height)
        .legend(legend_table())
        .line_width(1)
        .fill_opacity(10)
    )
    if bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)
    for target in targets:
        panel = panel.with_target(target)
    if searches:
        panel = panel.data_links(links(Frame.SERIES, *searches))
    return panel


def stat_panel(
    ids: Ids,
    title: str,
    description: str,
    expr: str,
    legend: str,
    unit: str,
    *,
    steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
    span: int = 6,
    searches: tuple[TraceSearch, ...] = (),
) -> stat.Panel:
    """A stat per series of an instant query (one per service when ``expr`` groups by job).

    The query returns time series, not a table: Grafana reduces each series to its own stat
    (``values: false``), where a table frame would be reduced to its last row, one arbitrary
    service.
    """
    panel = (
        stat.Panel()
        .id(ids())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(5)
        .thresholds(thresholds(*steps))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(instant(expr, legend, table_format=False))
    )
    if searches:
        panel = panel.data_links(links(Frame.SERIES, *searches))
    return panel


def bar_gauge_panel(
    ids: Ids,
    title: str,
    description: str,
    expr: str,
    legend: str,
    unit: str,
    *,
    span: int = 6,
    searches: tuple[TraceSearch, ...] = (),
) -> bargauge.Panel:
    """One bar per series of an instant query (in the query's order: ``sort_desc`` puts the
    largest first); links read each bar's series labels."""
    panel = (
        bargauge.Panel()
        .id(ids())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(span)
        .height(8)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .thresholds(thresholds((None, "red")))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(instant(expr, legend, table_format=False))
    )
    if searches:
        panel = panel.data_links(links(Frame.SERIES, *searches))
    return panel


def table_panel(
    ids: Ids,
    title: str,
    description: str,
    expr: str,
    *,
    span: int = 12,
    searches: tuple[TraceSearch, ...] = (),
) -> table.Panel:
    """A table of an instant query, one row per series; links read the row's columns."""
    panel = (
        table.Panel()
        .id(ids())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(span)
        .height(8)
        .with_target(instant(expr, table_format=True))
    )
    if searches:
        panel = panel.data_links(links(Frame.TABLE, *searches))
    return panel


def base_dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    """A dashboard with the shared variables (data source, services, Jaeger URL) and links."""
    job = (
        db.QueryVariable(q.JOB)
        .label("Service (job)")
        .description("service.name of the instrumented service")
        .datasource(DATASOURCE)
        .query(f"label_values({q.KICKOFFS_ACTIVE}, {q.JOB})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    jaeger_url = (
        db.TextBoxVariable("jaeger_url")
        .label("Jaeger UI")
        .description("Base URL of the Jaeger UI used by the panel links")
        .default_value("http://127.0.0.1:16686")
    )
    return (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(job)
        .with_variable(jaeger_url)
        .links(
            [
                db.DashboardLink("crew_otel dashboards")
                .type(dm.DashboardLinkType.DASHBOARDS)
                .tags(["crew_otel"])
                .as_dropdown(True)
                .include_vars(True)
                .keep_time(True),
                db.DashboardLink("Jaeger search")
                .type(dm.DashboardLinkType.LINK)
                .url("${jaeger_url}/search")
                .target_blank(True),
                # The Monitor tab opens on SERVER spans; crew_otel's are INTERNAL and CLIENT.
                db.DashboardLink(JAEGER_MONITOR_TITLE)
                .type(dm.DashboardLinkType.LINK)
                .url("${jaeger_url}/monitor")
                .tooltip(JAEGER_MONITOR_TOOLTIP)
                .target_blank(True),
            ]
        )
    )
