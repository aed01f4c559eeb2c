"""Generate the crew_otel Grafana dashboards as code.

The JSON files next to this script are generated; edit this file, then run

    python dashboards/generate.py          # rewrite dashboards/*.json
    python dashboards/generate.py --check  # exit 1 if a committed file is out of date

Built with the official grafana-foundation-sdk (Python >= 3.11). Every panel queries the
Prometheus data source picked by the ``${datasource}`` variable and filters on the ``job``
variable (service.name of the instrumented service). Histogram queries have exemplars on:
with the compose stack's Prometheus data source, an exemplar opens its trace in Jaeger.
Panels link to Jaeger searches (the Jaeger UI at ``${jaeger_url}``, and Grafana Explore on
the ``jaeger`` data source) for the span tags that matter: ``crew_otel.error.origin=true``,
``crew_otel.shared_instance=true``, ``crew_otel.request.id=...``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
JAEGER_DATASOURCE_UID = "jaeger"
JOB = 'job=~"$job"'
RATE = "$__rate_interval"
TAGS = ["crew_otel", "crewai", "opentelemetry"]


# --- links to Jaeger ---------------------------------------------------------------------

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


def jaeger_ui_link(
    title: str, tags: dict[str, str], operation: str | None = None
) -> db.DashboardLink:
    """A data link to the Jaeger UI search page: the series' service (job label) and tags."""
    params = [("service", "${__field.labels.job}")]
    if operation:
        params.append(("operation", operation))
    if tags:
        params.append(("tags", json.dumps(tags, separators=(",", ":"))))
    url = "${jaeger_url}/search?" + "&".join(f"{k}={encode(v)}" for k, v in params)
    url += "&start=${__from}000&end=${__to}000&lookback=custom&limit=50"
    return db.DashboardLink(title).url(url).target_blank(True)


def jaeger_explore_link(title: str, tags: dict[str, str]) -> db.DashboardLink:
    """A data link to Grafana Explore, searching the Jaeger data source for these tags."""
    panes = {
        "crew": {
            "datasource": JAEGER_DATASOURCE_UID,
            "queries": [
                {
                    "refId": "A",
                    "datasource": {"type": "jaeger", "uid": JAEGER_DATASOURCE_UID},
                    "queryType": "search",
                    "service": "${__field.labels.job}",
                    "tags": " ".join(f"{k}={v}" for k, v in tags.items()),
                    "limit": 50,
                }
            ],
            "range": {"from": "${__from}", "to": "${__to}"},
        }
    }
    url = "/explore?schemaVersion=1&orgId=1&panes=" + encode(
        json.dumps(panes, separators=(",", ":"))
    )
    return db.DashboardLink(title).url(url).target_blank(True)


def jaeger_links(what: str, tags: dict[str, str]) -> list[db.DashboardLink]:
    return [
        jaeger_ui_link(f"Jaeger: {what}", tags),
        jaeger_explore_link(f"Explore traces: {what}", tags),
    ]


ORIGIN_LINKS = jaeger_links(
    "error origins of this series",
    {"crew_otel.error.origin": "true", "error.type": "${__field.labels.error_type}"},
)
ANY_ORIGIN_LINKS = jaeger_links("error origins", {"crew_otel.error.origin": "true"})
FATAL_LINKS = jaeger_links(
    "unrecovered error origins",
    {"crew_otel.error.origin": "true", "crew_otel.error.recovered": "false"},
)
RECOVERED_LINKS = jaeger_links("retried (recovered) errors", {"crew_otel.error.recovered": "true"})
SHARED_LINKS = jaeger_links("shared-instance conflicts", {"crew_otel.shared_instance": "true"})
REQUEST_LINKS = jaeger_links(
    "traces of request ${request_id}",
    {"crew_otel.request.id": "${request_id}"},
)


# --- panel builders -------------------------------------------------------------------------


def query(
    expr: str,
    legend: str = "",
    ref_id: str = "A",
    *,
    exemplar: bool = False,
    instant: bool = False,
) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if exemplar:
        q = q.exemplar(True)
    return q.instant().format(PromQueryFormat.TABLE) if instant else q.range()


def sel(metric: str, *matchers: str) -> str:
    """``metric{job=~"$job", matchers...}``."""
    return metric + "{" + ", ".join((JOB, *matchers)) + "}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[{RATE}])"


def quantile(q: float, metric: str, by: str, extra_selector: str = "") -> str:
    selector = JOB + (", " + extra_selector if extra_selector else "")
    return (
        f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))"
    )


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


def ts(
    ids: Ids,
    title: str,
    description: str,
    targets: list[prometheus.Dataquery],
    unit: str,
    *,
    links: list[db.DashboardLink] | None = None,
    span: int = 12,
    height: int = 8,
    bars: bool = False,
) -> timeseries.Panel:
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
    for t in targets:
        panel = panel.with_target(t)
    if links:
        panel = panel.data_links(links)
    return panel


def stat_panel(
    ids: Ids,
    title: str,
    description: str,
    target: prometheus.Dataquery,
    unit: str,
    *,
    steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
    span: int = 6,
    links: list[db.DashboardLink] | None = None,
) -> stat.Panel:
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
        .with_target(target)
    )
    if links:
        panel = panel.data_links(links)
    return panel


def table_panel(
    ids: Ids,
    title: str,
    description: str,
    target: prometheus.Dataquery,
    *,
    span: int = 12,
    links: list[db.DashboardLink] | None = None,
) -> table.Panel:
    panel = (
        table.Panel()
        .id(ids())
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(span)
        .height(8)
        .with_target(target)
    )
    if links:
        panel = panel.data_links(links)
    return panel


def base_dashboard(uid: str, title: str, description: str) -> db.Dashboard:
    job = (
        db.QueryVariable("job")
        .label("Service (job)")
        .description("service.name of the instrumented service")
        .datasource(DATASOURCE)
        .query("label_values(crew_otel_kickoffs_active, job)")
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
        .editable()
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
            ]
        )
    )


# --- dashboards ----------------------------------------------------------------------------

WORKFLOW_COUNT = "gen_ai_workflow_duration_seconds_count"
ORIGIN_TRUE = 'crew_otel_error_origin="true"'
HAS_ERROR = 'error_type!=""'
NOT_AGENT = 'crew_otel_retry_layer!="agent"'
WORKFLOW_ERROR_RATIO = (
    f'sum by (job) (rate(gen_ai_workflow_duration_seconds_count{{{JOB}, error_type!=""}}[{RATE}]))'
    f" / sum by (job) (rate(gen_ai_workflow_duration_seconds_count{{{JOB}}}[{RATE}]))"
)


def overlap() -> db.Dashboard:
    ids = Ids()
    request_id = (
        db.TextBoxVariable("request_id")
        .label("Request ID")
        .description("A crew_otel.request.id (X-Request-ID) for the 'traces of request' links")
        .default_value("")
    )
    in_flight = ts(
        ids,
        "Kickoffs in flight",
        "Crew runs executing at once, per process and crew (crew_otel.kickoffs.active), "
        "against crew_otel:kickoff_concurrency_limit from the alert rules. Intermittent "
        "failures that only happen when this is above 1 point at shared state.",
        [
            query(
                "sum by (job, instance, gen_ai_workflow_name) "
                f"({sel('crew_otel_kickoffs_active')})",
                "{{job}} {{instance}} {{gen_ai_workflow_name}}",
            ),
            query("crew_otel:kickoff_concurrency_limit", "limit", "B"),
        ],
        "short",
        links=SHARED_LINKS + REQUEST_LINKS,
    ).override_by_name(
        "limit",
        [
            dm.DynamicConfigValue(
                id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
            ),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        ],
    )
    return (
        base_dashboard(
            "crew-otel-overlap",
            "crew_otel / Overlap",
            "How crew runs overlap: kickoffs in flight, the wait before an async kickoff "
            "starts, and whether errors follow concurrency.",
        )
        .with_variable(request_id)
        .with_row(db.Row("Concurrency").id(ids()))
        .with_panel(in_flight)
        .with_panel(
            ts(
                ids,
                "Kickoff rate",
                "Completed kickoffs per second by crew (gen_ai.workflow.duration count).",
                [
                    query(
                        "sum by (job, gen_ai_workflow_name) "
                        f"(rate(gen_ai_workflow_duration_seconds_count{{{JOB}}}[{RATE}]))",
                        "{{job}} {{gen_ai_workflow_name}}",
                    )
                ],
                "ops",
                span=8,
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "Peak kickoffs in flight",
                "Highest number of kickoffs running at once in one process over the time range.",
                query(
                    "max(max_over_time(sum by (job, instance) "
                    f"({sel('crew_otel_kickoffs_active')})[$__range:]))",
                    instant=True,
                ),
                "short",
                steps=((None, "green"), (8, "orange"), (13, "red")),
                span=4,
            )
        )
        .with_row(db.Row("Waiting").id(ids()))
        .with_panel(
            ts(
                ids,
                "Wait before start (async kickoffs)",
                "Time between an async kickoff being called and its work starting in the event "
                "loop's default executor (crew_otel.kickoff.queue_wait). Growing waits mean "
                "every executor thread is busy: sync calls in async code, or more concurrent "
                "kickoffs than threads.",
                [
                    query(
                        quantile(0.5, "crew_otel_kickoff_queue_wait_seconds", "job"),
                        "{{job}} p50",
                        exemplar=True,
                    ),
                    query(
                        quantile(0.95, "crew_otel_kickoff_queue_wait_seconds", "job"),
                        "{{job}} p95",
                        "B",
                        exemplar=True,
                    ),
                ],
                "s",
                links=REQUEST_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "Average wait before start by crew",
                "Mean queue wait per crew (sum / count of crew_otel.kickoff.queue_wait).",
                [
                    query(
                        "sum by (job, gen_ai_workflow_name) "
                        f"(rate(crew_otel_kickoff_queue_wait_seconds_sum{{{JOB}}}[{RATE}]))"
                        " / sum by (job, gen_ai_workflow_name) "
                        f"(rate(crew_otel_kickoff_queue_wait_seconds_count{{{JOB}}}[{RATE}]))",
                        "{{job}} {{gen_ai_workflow_name}}",
                    )
                ],
                "s",
            )
        )
        .with_row(db.Row("Concurrency vs errors").id(ids()))
        .with_panel(
            ts(
                ids,
                "Kickoffs in flight vs workflow error ratio",
                "In-flight kickoffs (left axis) against the share of kickoffs that failed "
                "(right axis). An error ratio that rises and falls with concurrency is the "
                "signature of state shared between runs or a concurrency limit upstream.",
                [
                    query(
                        f"sum by (job) (crew_otel_kickoffs_active{{{JOB}}})",
                        "{{job}} in flight",
                    ),
                    query(WORKFLOW_ERROR_RATIO, "{{job}} error ratio", "B"),
                ],
                "short",
                links=ANY_ORIGIN_LINKS + SHARED_LINKS,
                span=24,
            ).override_by_regexp(
                ".*error ratio",
                [
                    dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                    dm.DynamicConfigValue(id_val="unit", value="percentunit"),
                    dm.DynamicConfigValue(id_val="max", value=1),
                ],
            )
        )
        .with_panel(
            ts(
                ids,
                "Workflow error ratio by crew",
                "Failed kickoffs / all kickoffs per crew. The alert fires above 5 % for 10 "
                "minutes.",
                [
                    query(
                        "sum by (job, gen_ai_workflow_name) "
                        f"({rate(WORKFLOW_COUNT, HAS_ERROR)})"
                        " / sum by (job, gen_ai_workflow_name) "
                        f"({rate(WORKFLOW_COUNT)})",
                        "{{job}} {{gen_ai_workflow_name}}",
                    )
                ],
                "percentunit",
                links=ANY_ORIGIN_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "Failed kickoffs by error type",
                "Kickoffs that ended with an error, by error.type of the kickoff span.",
                [
                    query(
                        f"sum by (job, error_type) ({rate(WORKFLOW_COUNT, HAS_ERROR)})",
                        "{{job}} {{error_type}}",
                    )
                ],
                "ops",
                links=ORIGIN_LINKS,
            )
        )
    )


def retries() -> db.Dashboard:
    ids = Ids()
    kickoff_rate = f"sum by (job) (rate(gen_ai_workflow_duration_seconds_count{{{JOB}}}[{RATE}]))"
    return (
        base_dashboard(
            "crew-otel-retries",
            "crew_otel / Retries",
            "Where retries pile up: per layer (HTTP, rate limit, agent re-execution), per "
            "provider, and how many retries each kickoff costs.",
        )
        .with_row(db.Row("Retries").id(ids()))
        .with_panel(
            ts(
                ids,
                "Retries by layer",
                "crew_otel.retries by layer: http (SDK resends, http.request.resend_count), "
                "rate_limit (CrewAI's rate-limit retry), agent (CrewAI re-ran the agent, "
                "crew_otel.attempt >= 2).",
                [
                    query(
                        "sum by (job, crew_otel_retry_layer) "
                        f"(rate(crew_otel_retries_total{{{JOB}}}[{RATE}]))",
                        "{{job}} {{crew_otel_retry_layer}}",
                    )
                ],
                "ops",
                links=RECOVERED_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "Retries by provider and error",
                "HTTP and rate-limit retries per model provider and the error that caused them.",
                [
                    query(
                        "sum by (job, gen_ai_provider_name, error_type) "
                        f"({rate('crew_otel_retries_total', NOT_AGENT)})",
                        "{{job}} {{gen_ai_provider_name}} {{error_type}}",
                    )
                ],
                "ops",
                links=ORIGIN_LINKS,
            )
        )
        .with_row(db.Row("Amplification").id(ids()))
        .with_panel(
            ts(
                ids,
                "Retry amplification (retries per kickoff)",
                "All retries divided by completed kickoffs. Above 3 for 10 minutes fires "
                "CrewOtelRetryAmplification: each user request costs several provider calls.",
                [
                    query(
                        f"sum by (job) ({rate('crew_otel_retries_total')}) / {kickoff_rate}",
                        "{{job}}",
                    )
                ],
                "short",
                links=RECOVERED_LINKS,
            )
            .thresholds(thresholds((None, "green"), (3, "red")))
            .thresholds_style(
                cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE)
            )
        )
        .with_panel(
            ts(
                ids,
                "Retries per kickoff by layer",
                "Which layer the amplification comes from.",
                [
                    query(
                        "sum by (job, crew_otel_retry_layer) "
                        f"({rate('crew_otel_retries_total')})"
                        f" / on (job) group_left () {kickoff_rate}",
                        "{{job}} {{crew_otel_retry_layer}}",
                    )
                ],
                "short",
            )
        )
        .with_panel(
            ts(
                ids,
                "Model calls per kickoff",
                "gen_ai.client.operation.duration count per completed kickoff. Rising with "
                "the same inputs means agents loop longer (more steps, more context).",
                [
                    query(
                        "sum by (job) "
                        f"({rate('gen_ai_client_operation_duration_seconds_count')})"
                        f" / {kickoff_rate}",
                        "{{job}}",
                    )
                ],
                "short",
            )
        )
        .with_panel(
            ts(
                ids,
                "HTTP attempts by status and host",
                "Every HTTP attempt to the providers (http.client.request.duration count) by "
                "server and status code, retries included.",
                [
                    query(
                        "sum by (job, server_address, http_response_status_code) "
                        f"(rate(http_client_request_duration_seconds_count{{{JOB}}}[{RATE}]))",
                        "{{job}} {{server_address}} {{http_response_status_code}}",
                    )
                ],
                "ops",
                links=ANY_ORIGIN_LINKS,
            )
        )
        .with_row(db.Row("Totals").id(ids()))
        .with_panel(
            table_panel(
                ids,
                "Retries in the time range",
                "Total retries per service, layer and provider over the selected time range.",
                query(
                    "sum by (job, crew_otel_retry_layer, gen_ai_provider_name) "
                    f"(increase(crew_otel_retries_total{{{JOB}}}[$__range]))",
                    instant=True,
                ),
                span=24,
                links=RECOVERED_LINKS,
            )
        )
    )


def error_origins() -> db.Dashboard:
    ids = Ids()
    origins = f"crew_otel_error_origins_total{{{JOB}}}"
    return (
        base_dashboard(
            "crew-otel-error-origins",
            "crew_otel / Error origins",
            "Which span each failure originated in (crew_otel.error.origin): the operation, "
            "the error type, and whether a retry recovered it.",
        )
        .with_row(db.Row("Where errors start").id(ids()))
        .with_panel(
            table_panel(
                ids,
                "Top error origins (time range)",
                "The ten most frequent (origin operation, error type) pairs over the time "
                "range. Follow a row's link to the origin spans in Jaeger.",
                query(
                    "topk(10, sum by (job, crew_otel_origin_operation, error_type) "
                    f"(increase({origins}[$__range])))",
                    instant=True,
                ),
                span=12,
                links=ORIGIN_LINKS,
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "Unrecovered error origins (time range)",
                "Errors that no retry recovered: these reached the caller.",
                query(
                    "sum by (job) (increase(crew_otel_error_origins_total"
                    f'{{{JOB}, crew_otel_error_recovered="false"}}[$__range]))',
                    "{{job}}",
                    instant=True,
                ),
                "short",
                steps=((None, "green"), (1, "red")),
                links=FATAL_LINKS,
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "Recovered error origins (time range)",
                "Errors a retry papered over: invisible to users, but they cost time and "
                "provider quota.",
                query(
                    "sum by (job) (increase(crew_otel_error_origins_total"
                    f'{{{JOB}, crew_otel_error_recovered="true"}}[$__range]))',
                    "{{job}}",
                    instant=True,
                ),
                "short",
                steps=((None, "green"), (1, "orange")),
                links=RECOVERED_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "Error origins by operation",
                "Origins per second by the operation of the origin span: http, chat, "
                "execute_tool, invoke_agent, task, invoke_workflow.",
                [
                    query(
                        f"sum by (job, crew_otel_origin_operation) (rate({origins}[{RATE}]))",
                        "{{job}} {{crew_otel_origin_operation}}",
                    )
                ],
                "ops",
                links=ANY_ORIGIN_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "Error origins by error type",
                "HTTP status codes (500, 429, ...) or exception class names.",
                [
                    query(
                        f"sum by (job, error_type) (rate({origins}[{RATE}]))",
                        "{{job}} {{error_type}}",
                    )
                ],
                "ops",
                links=ORIGIN_LINKS,
            )
        )
        .with_row(db.Row("Recovered vs fatal").id(ids()))
        .with_panel(
            ts(
                ids,
                "Recovered vs fatal",
                "crew_otel.error.recovered=true: a later attempt succeeded. false: the error "
                "propagated.",
                [
                    query(
                        f"sum by (job, crew_otel_error_recovered) (rate({origins}[{RATE}]))",
                        "{{job}} recovered={{crew_otel_error_recovered}}",
                    )
                ],
                "ops",
                links=FATAL_LINKS + RECOVERED_LINKS,
                bars=True,
            )
        )
        .with_panel(
            ts(
                ids,
                "Origin spans by span name (span metrics, before sampling)",
                "Calls of spans marked crew_otel.error.origin=true, from the Collector's "
                "span_metrics connector: every span counts, sampled or not.",
                [
                    query(
                        "sum by (job, span_name, error_type) "
                        f"({rate('traces_span_metrics_calls_total', ORIGIN_TRUE)})",
                        "{{job}} {{span_name}} {{error_type}}",
                    )
                ],
                "ops",
                links=ORIGIN_LINKS,
            )
        )
    )


def latency() -> db.Dashboard:
    ids = Ids()

    def pair(metric: str, by: str, legend: str) -> list[prometheus.Dataquery]:
        return [
            query(quantile(0.5, metric, by), legend + " p50", exemplar=True),
            query(quantile(0.95, metric, by), legend + " p95", "B", exemplar=True),
        ]

    slow_kickoffs = [
        jaeger_ui_link(
            "Jaeger: slowest kickoffs of this crew",
            {},
            operation="invoke_workflow ${__field.labels.gen_ai_workflow_name}",
        )
    ]
    return (
        base_dashboard(
            "crew-otel-latency",
            "crew_otel / Latency",
            "p50 / p95 of kickoffs, agent executions, tool calls and model calls, from the "
            "duration histograms. Exemplars link to traces.",
        )
        .with_row(db.Row("Crew").id(ids()))
        .with_panel(
            ts(
                ids,
                "Workflow (kickoff) duration",
                "gen_ai.workflow.duration by crew.",
                pair(
                    "gen_ai_workflow_duration_seconds",
                    "job, gen_ai_workflow_name",
                    "{{job}} {{gen_ai_workflow_name}}",
                ),
                "s",
                links=slow_kickoffs + ANY_ORIGIN_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "Agent execution duration",
                "gen_ai.invoke_agent.duration by agent role (each attempt counts).",
                pair(
                    "gen_ai_invoke_agent_duration_seconds",
                    "job, gen_ai_agent_name",
                    "{{job}} {{gen_ai_agent_name}}",
                ),
                "s",
            )
        )
        .with_panel(
            ts(
                ids,
                "Tool call duration",
                "gen_ai.execute_tool.duration by tool.",
                pair(
                    "gen_ai_execute_tool_duration_seconds",
                    "job, gen_ai_tool_name",
                    "{{job}} {{gen_ai_tool_name}}",
                ),
                "s",
            )
        )
        .with_panel(
            ts(
                ids,
                "Model call duration",
                "gen_ai.client.operation.duration by provider and model.",
                pair(
                    "gen_ai_client_operation_duration_seconds",
                    "job, gen_ai_provider_name, gen_ai_request_model",
                    "{{job}} {{gen_ai_provider_name}} {{gen_ai_request_model}}",
                ),
                "s",
            )
        )
        .with_row(db.Row("Tokens").id(ids()))
        .with_panel(
            ts(
                ids,
                "Tokens per second",
                "gen_ai.client.token.usage by model and token type.",
                [
                    query(
                        "sum by (job, gen_ai_request_model, gen_ai_token_type) "
                        f"(rate(gen_ai_client_token_usage_sum{{{JOB}}}[{RATE}]))",
                        "{{job}} {{gen_ai_request_model}} {{gen_ai_token_type}}",
                    )
                ],
                "short",
            )
        )
        .with_panel(
            ts(
                ids,
                "Input tokens per model call (p95)",
                "Prompt size per call. A p95 that climbs during a run means context grows "
                "with every agent step, which slows calls and ends in context-window errors.",
                [
                    query(
                        quantile(
                            0.95,
                            "gen_ai_client_token_usage",
                            "job, gen_ai_request_model",
                            'gen_ai_token_type="input"',
                        ),
                        "{{job}} {{gen_ai_request_model}}",
                        exemplar=True,
                    )
                ],
                "short",
            )
        )
        .with_row(db.Row("Spans").id(ids()))
        .with_panel(
            ts(
                ids,
                "Span duration p95 by span name (span metrics)",
                "From the Collector's span_metrics connector (every span, before sampling), "
                "with exemplars.",
                [
                    query(
                        quantile(
                            0.95,
                            "traces_span_metrics_duration_milliseconds",
                            "job, span_name",
                        ),
                        "{{job}} {{span_name}}",
                        exemplar=True,
                    )
                ],
                "ms",
                span=24,
            )
        )
    )


def shared_instances() -> db.Dashboard:
    ids = Ids()
    conflicts = f"crew_otel_shared_instance_conflicts_total{{{JOB}}}"
    return (
        base_dashboard(
            "crew-otel-shared-instances",
            "crew_otel / Shared-instance conflicts",
            "One Crew, Agent, Task, tool or LLM object used by two requests at the same time. "
            "Every conflict is a bug: build these objects per request.",
        )
        .with_row(db.Row("Conflicts").id(ids()))
        .with_panel(
            stat_panel(
                ids,
                "Conflicts counted (since process start)",
                "crew_otel.shared_instance.conflicts of the running processes. Anything above "
                "zero means state leaks between requests.",
                query(f"sum by (job) ({conflicts})", "{{job}}", instant=True),
                "short",
                steps=((None, "green"), (1, "red")),
                links=SHARED_LINKS,
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "New conflicts (time range)",
                "Increase over the selected time range.",
                query(f"sum by (job) (increase({conflicts}[$__range]))", "{{job}}", instant=True),
                "short",
                steps=((None, "green"), (1, "red")),
                links=SHARED_LINKS,
            )
        )
        .with_panel(
            table_panel(
                ids,
                "Conflicts by kind",
                "Per process and kind: crew, agent, task, tool, llm, task_inputs (a Task "
                "interpolated with another request's inputs).",
                query(
                    f"sum by (job, instance, crew_otel_shared_instance_kind) ({conflicts})",
                    instant=True,
                ),
                links=SHARED_LINKS,
            )
        )
        .with_panel(
            ts(
                ids,
                "New conflicts by kind",
                "Conflicts per interval. They happen only while kickoffs overlap (below).",
                [
                    query(
                        "sum by (job, crew_otel_shared_instance_kind) "
                        f"(increase({conflicts}[{RATE}]))",
                        "{{job}} {{crew_otel_shared_instance_kind}}",
                    )
                ],
                "short",
                links=SHARED_LINKS,
                bars=True,
            )
        )
        .with_panel(
            ts(
                ids,
                "Kickoffs in flight",
                "Concurrency at the time of the conflicts.",
                [query(f"sum by (job) (crew_otel_kickoffs_active{{{JOB}}})", "{{job}}")],
                "short",
                links=SHARED_LINKS,
            )
        )
    )


DASHBOARDS = {
    "crew-otel-overlap.json": overlap,
    "crew-otel-retries.json": retries,
    "crew-otel-error-origins.json": error_origins,
    "crew-otel-latency.json": latency,
    "crew-otel-shared-instances.json": shared_instances,
}


def render(builder: db.Dashboard) -> str:
    """The dashboard as stable, diff-friendly JSON text."""
    data = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: render(make()) for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build_all().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date, run python dashboards/generate.py:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
