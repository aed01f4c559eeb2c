"""Latency: p50 / p95 of kickoffs, agent executions, tool calls and model calls, tokens per
call, and span durations from the Collector's span metrics.

Exemplars are on only for the "failed" series: a failed operation's span has an error status,
so tail sampling keeps its trace and the exemplar opens it. An exemplar of any series picks an
arbitrary recent trace, which tail sampling keeps only at TRACE_SAMPLE_PERCENT.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus

from crew_otel import attributes as a

from . import promql as q
from .grafana import ANY_ORIGIN, Frame, Ids, TraceSearch, base_dashboard, query, row, ts

SLOW_KICKOFFS = TraceSearch(
    "slowest kickoffs of this crew", operation=(a.SPAN_WORKFLOW, q.WORKFLOW)
)


def percentiles(histogram: q.Histogram, *labels: str) -> list[prometheus.Dataquery]:
    """p50 and p95 of all calls, and p95 of failed calls with exemplars (kept traces)."""
    grouping = q.by(*labels)
    legend = q.legend(*labels)
    return [
        query(q.quantile(0.5, histogram, grouping), legend + " p50"),
        query(q.quantile(0.95, histogram, grouping), legend + " p95", "B"),
        query(
            q.quantile(0.95, histogram, grouping, q.FAILED),
            legend + " failed p95",
            "C",
            exemplar=True,
        ),
    ]


def build() -> db.Dashboard:
    """The Latency dashboard."""
    ids = Ids()
    return (
        base_dashboard(
            "crew-otel-latency",
            "crew_otel / Latency",
            "p50 / p95 of kickoffs, agent executions, tool calls and model calls, from the "
            "duration histograms. Exemplars (on the failed p95 series) open kept traces.",
        )
        .with_row(row(ids, "Crew"))
        .with_panel(
            ts(
                ids,
                "Workflow (kickoff) duration",
                "gen_ai.invoke_workflow.duration by crew. Exemplars on the failed p95 series open "
                "the failed kickoff's trace.",
                percentiles(q.WORKFLOW_DURATION, q.WORKFLOW),
                "s",
            ).data_links([SLOW_KICKOFFS.ui_link(Frame.SERIES), *ANY_ORIGIN.links(Frame.SERIES)])
        )
        .with_panel(
            ts(
                ids,
                "Agent execution duration",
                "gen_ai.invoke_agent.duration by agent role (each attempt counts).",
                percentiles(q.AGENT_DURATION, q.AGENT),
                "s",
            )
        )
        .with_panel(
            ts(
                ids,
                "Tool call duration",
                "gen_ai.execute_tool.duration by tool.",
                percentiles(q.TOOL_DURATION, q.TOOL),
                "s",
            )
        )
        .with_panel(
            ts(
                ids,
                "Model call duration",
                "gen_ai.client.operation.duration by provider and model.",
                percentiles(q.OPERATION_DURATION, q.PROVIDER, q.MODEL),
                "s",
            )
        )
        .with_row(row(ids, "Tokens"))
        .with_panel(
            ts(
                ids,
                "Tokens per second",
                "gen_ai.client.token.usage by model and token type.",
                [
                    query(
                        q.sum_by(q.by(q.MODEL, q.TOKEN_TYPE), q.rate(q.TOKEN_USAGE.sum)),
                        q.legend(q.MODEL, q.TOKEN_TYPE),
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
                        q.quantile(0.95, q.TOKEN_USAGE, q.by(q.MODEL), q.INPUT_TOKENS),
                        q.legend(q.MODEL),
                    )
                ],
                "short",
            )
        )
        .with_row(row(ids, "Spans"))
        .with_panel(
            ts(
                ids,
                "Span duration p95 by span name (span metrics)",
                "From the Collector's span_metrics connector (every span, before sampling). "
                "Exemplars on the failed series open the failed span's trace.",
                [
                    query(
                        q.quantile(0.95, q.SPAN_DURATION, q.by(q.SPAN_NAME)),
                        q.legend(q.SPAN_NAME),
                    ),
                    query(
                        q.quantile(0.95, q.SPAN_DURATION, q.by(q.SPAN_NAME), q.FAILED),
                        q.legend(q.SPAN_NAME) + " failed",
                        "B",
                        exemplar=True,
                    ),
                ],
                "ms",
                span=24,
            )
        )
    )
