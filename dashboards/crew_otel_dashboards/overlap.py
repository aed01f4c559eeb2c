"""Overlap: how crew runs overlap, the wait before an async kickoff starts, and whether errors
follow concurrency."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.models import dashboard as dm

from . import promql as q
from .grafana import (
    ANY_ORIGIN,
    ORIGINS_OF_SERIES,
    REQUEST,
    SHARED,
    Ids,
    base_dashboard,
    query,
    row,
    stat_panel,
    ts,
)

#: Recording rule in collector/prometheus/alerts.yml.
CONCURRENCY_LIMIT = "crew_otel:kickoff_concurrency_limit"


def workflow_error_ratio(*labels: str) -> str:
    """Failed kickoffs / all kickoffs."""
    count = q.WORKFLOW_DURATION.count
    return q.ratio(
        q.sum_by(q.by(*labels), q.rate(count, q.FAILED)), q.sum_by(q.by(*labels), q.rate(count))
    )


def in_flight_panel(ids: Ids) -> timeseries.Panel:
    return ts(
        ids,
        "Kickoffs in flight",
        "Crew runs executing at once, per process and crew (crew_otel.kickoffs.active), "
        f"against {CONCURRENCY_LIMIT} from the alert rules. Intermittent "
        "failures that only happen when this is above 1 point at shared state.",
        [
            query(
                q.sum_by(q.by(q.INSTANCE, q.WORKFLOW), q.sel(q.KICKOFFS_ACTIVE)),
                q.legend(q.INSTANCE, q.WORKFLOW),
            ),
            query(CONCURRENCY_LIMIT, "limit", "B"),
        ],
        "short",
        searches=(SHARED, REQUEST),
    ).override_by_name(
        "limit",
        [
            dm.DynamicConfigValue(
                id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
            ),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        ],
    )


def build() -> db.Dashboard:
    """The Overlap dashboard."""
    ids = Ids()
    request_id = (
        db.TextBoxVariable("request_id")
        .label("Request ID")
        .description("A crew_otel.request.id (X-Request-ID) for the 'traces of request' links")
        .default_value("")
    )
    wait = q.QUEUE_WAIT
    in_flight = in_flight_panel(ids)  # panel id 1, before the first row (stable JSON)
    return (
        base_dashboard(
            "crew-otel-overlap",
            "crew_otel / Overlap",
            "How crew runs overlap: kickoffs in flight, the wait before an async kickoff "
            "starts, and whether errors follow concurrency.",
        )
        .with_variable(request_id)
        .with_row(row(ids, "Concurrency"))
        .with_panel(in_flight)
        .with_panel(
            ts(
                ids,
                "Kickoff rate",
                "Completed kickoffs per second by crew (gen_ai.invoke_workflow.duration count).",
                [
                    query(
                        q.sum_by(q.by(q.WORKFLOW), q.rate(q.WORKFLOW_DURATION.count)),
                        q.legend(q.WORKFLOW),
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
                f"max(max_over_time({q.sum_by(q.by(q.INSTANCE), q.sel(q.KICKOFFS_ACTIVE))}"
                f"[{q.RANGE}:]))",
                "",
                "short",
                steps=((None, "green"), (8, "orange"), (13, "red")),
                span=4,
            )
        )
        .with_row(row(ids, "Waiting"))
        .with_panel(
            ts(
                ids,
                "Wait before start (async kickoffs)",
                "Time between an async kickoff being called and its work starting in the event "
                "loop's default executor (crew_otel.kickoff.queue_wait). Growing waits mean "
                "every executor thread is busy: sync calls in async code, or more concurrent "
                "kickoffs than threads.",
                [
                    query(q.quantile(0.5, wait, q.JOB), q.legend() + " p50"),
                    query(q.quantile(0.95, wait, q.JOB), q.legend() + " p95", "B"),
                ],
                "s",
                searches=(REQUEST,),
            )
        )
        .with_panel(
            ts(
                ids,
                "Average wait before start by crew",
                "Mean queue wait per crew (sum / count of crew_otel.kickoff.queue_wait).",
                [
                    query(
                        q.ratio(
                            q.sum_by(q.by(q.WORKFLOW), q.rate(wait.sum)),
                            q.sum_by(q.by(q.WORKFLOW), q.rate(wait.count)),
                        ),
                        q.legend(q.WORKFLOW),
                    )
                ],
                "s",
            )
        )
        .with_row(row(ids, "Concurrency vs errors"))
        .with_panel(
            ts(
                ids,
                "Kickoffs in flight vs workflow error ratio",
                "In-flight kickoffs (left axis) against the share of kickoffs that failed "
                "(right axis). An error ratio that rises and falls with concurrency is the "
                "signature of state shared between runs or a concurrency limit upstream.",
                [
                    query(q.sum_by(q.JOB, q.sel(q.KICKOFFS_ACTIVE)), q.legend() + " in flight"),
                    query(workflow_error_ratio(), q.legend() + " error ratio", "B"),
                ],
                "short",
                searches=(ANY_ORIGIN, SHARED),
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
                [query(workflow_error_ratio(q.WORKFLOW), q.legend(q.WORKFLOW))],
                "percentunit",
                searches=(ANY_ORIGIN,),
            )
        )
        .with_panel(
            ts(
                ids,
                "Failed kickoffs by error type",
                "Kickoffs that ended with an error, by error.type of the kickoff span.",
                [
                    query(
                        q.sum_by(q.by(q.ERROR_TYPE), q.rate(q.WORKFLOW_DURATION.count, q.FAILED)),
                        q.legend(q.ERROR_TYPE),
                    )
                ],
                "ops",
                searches=(ORIGINS_OF_SERIES,),
            )
        )
    )
