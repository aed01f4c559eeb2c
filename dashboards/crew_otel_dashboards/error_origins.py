"""Error origins: why requests failed (crew_otel.failure.cause), which span each failure
originated in, its error type, and whether a retry recovered it."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from . import promql as q
from .grafana import (
    ANY_ORIGIN,
    FAILURE_CAUSE,
    FATAL,
    ORIGINS_OF_SERIES,
    RECOVERED,
    Ids,
    bar_gauge_panel,
    base_dashboard,
    query,
    row,
    stat_panel,
    table_panel,
    ts,
)

#: The window of "top causes now".
TOP_WINDOW = "5m"


def build() -> db.Dashboard:
    """The Error origins dashboard."""
    ids = Ids()
    origins = q.rate(q.ERROR_ORIGINS)
    return (
        base_dashboard(
            "crew-otel-error-origins",
            "crew_otel / Error origins",
            "Why requests failed (crew_otel.failure.cause, one per failed run), which span "
            "each failure originated in (crew_otel.error.origin): the operation, the error "
            "type, and whether a retry recovered it.",
        )
        .with_row(row(ids, "Why requests failed"))
        .with_panel(
            ts(
                ids,
                "Failed runs by cause",
                "Runs per second whose exception reached the caller, by crew_otel.failure.cause "
                "(one per failed run): shared_instance and shared_state are bugs (an object or "
                "state in use by another request); rate_limit, provider_error and "
                "provider_timeout the provider after every retry; context_window, guardrail, "
                "tool_error, cancelled, application_error the rest. Follow a series' link to "
                "its runs in Jaeger.",
                [
                    query(
                        q.sum_by(q.by(q.FAILURE_CAUSE), q.rate(q.FAILURES)),
                        q.legend(q.FAILURE_CAUSE),
                        exemplar=True,
                    )
                ],
                "reqps",
                searches=(FAILURE_CAUSE,),
                span=16,
            )
        )
        .with_panel(
            bar_gauge_panel(
                ids,
                "Top causes now (last 5 min)",
                "Failed runs of the last 5 minutes by cause, the most common first. Follow a "
                "bar's link to its runs in Jaeger (crew_otel.failure.cause=<cause>).",
                "sort_desc("
                + q.sum_by(q.by(q.FAILURE_CAUSE), q.increase(q.FAILURES, window=TOP_WINDOW))
                + ")",
                q.legend(q.FAILURE_CAUSE),
                "short",
                span=8,
                searches=(FAILURE_CAUSE,),
            )
        )
        .with_row(row(ids, "Where errors start"))
        .with_panel(
            table_panel(
                ids,
                "Top error origins (time range)",
                "The ten most frequent (origin operation, error type) pairs over the time "
                "range. Follow a row's link to the origin spans in Jaeger.",
                "topk(10, "
                + q.sum_by(q.by(q.ORIGIN_OPERATION, q.ERROR_TYPE), q.increase(q.ERROR_ORIGINS))
                + ")",
                span=12,
                searches=(ORIGINS_OF_SERIES,),
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "Unrecovered error origins (time range)",
                "Errors that no retry recovered: these reached the caller. One stat per service.",
                q.sum_by(q.JOB, q.increase(q.ERROR_ORIGINS, q.eq(q.ERROR_RECOVERED, "false"))),
                q.legend(),
                "short",
                steps=((None, "green"), (1, "red")),
                searches=(FATAL,),
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "Recovered error origins (time range)",
                "Errors a retry papered over: invisible to users, but they cost time and "
                "provider quota. One stat per service.",
                q.sum_by(q.JOB, q.increase(q.ERROR_ORIGINS, q.eq(q.ERROR_RECOVERED, "true"))),
                q.legend(),
                "short",
                steps=((None, "green"), (1, "orange")),
                searches=(RECOVERED,),
            )
        )
        .with_panel(
            ts(
                ids,
                "Error origins by operation",
                "Origins per second by the operation of the origin span: http, chat, "
                "execute_tool, invoke_agent, task, invoke_workflow.",
                [query(q.sum_by(q.by(q.ORIGIN_OPERATION), origins), q.legend(q.ORIGIN_OPERATION))],
                "ops",
                searches=(ANY_ORIGIN,),
            )
        )
        .with_panel(
            ts(
                ids,
                "Error origins by error type",
                "HTTP status codes (500, 429, ...) or exception class names.",
                [query(q.sum_by(q.by(q.ERROR_TYPE), origins), q.legend(q.ERROR_TYPE))],
                "ops",
                searches=(ORIGINS_OF_SERIES,),
            )
        )
        .with_row(row(ids, "Recovered vs fatal"))
        .with_panel(
            ts(
                ids,
                "Recovered vs fatal",
                "crew_otel.error.recovered=true: a later attempt succeeded. false: the error "
                "propagated.",
                [
                    query(
                        q.sum_by(q.by(q.ERROR_RECOVERED), origins),
                        q.legend() + " recovered={{" + q.ERROR_RECOVERED + "}}",
                    )
                ],
                "ops",
                searches=(FATAL, RECOVERED),
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
                        q.sum_by(
                            q.by(q.SPAN_NAME, q.ERROR_TYPE), q.rate(q.SPAN_CALLS, q.ORIGIN_TRUE)
                        ),
                        q.legend(q.SPAN_NAME, q.ERROR_TYPE),
                    )
                ],
                "ops",
                searches=(ORIGINS_OF_SERIES,),
            )
        )
    )
