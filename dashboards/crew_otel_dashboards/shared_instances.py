"""Shared-instance conflicts: one Crew, Agent, Task, tool or LLM object used by two requests at
the same time, next to concurrency, and the harm itself: answers carrying another request's
data (cross-talk)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from . import promql as q
from .grafana import (
    CROSSTALK,
    SHARED,
    Ids,
    base_dashboard,
    query,
    row,
    stat_panel,
    table_panel,
    ts,
)


def build() -> db.Dashboard:
    """The Shared-instance conflicts dashboard."""
    ids = Ids()
    conflicts = q.sel(q.SHARED_CONFLICTS)
    return (
        base_dashboard(
            "crew-otel-shared-instances",
            "crew_otel / Shared-instance conflicts",
            "One Crew, Agent, Task, tool or LLM object used by two requests at the same time. "
            "Every conflict is a bug: build these objects per request.",
        )
        .with_row(row(ids, "Conflicts"))
        .with_panel(
            stat_panel(
                ids,
                "Conflicts counted (since process start)",
                "crew_otel.shared_instance.conflicts of the running processes, one stat per "
                "service. Anything above zero means state leaks between requests.",
                q.sum_by(q.JOB, conflicts),
                q.legend(),
                "short",
                steps=((None, "green"), (1, "red")),
                searches=(SHARED,),
            )
        )
        .with_panel(
            stat_panel(
                ids,
                "New conflicts (time range)",
                "Increase over the selected time range, one stat per service.",
                q.sum_by(q.JOB, q.increase(q.SHARED_CONFLICTS)),
                q.legend(),
                "short",
                steps=((None, "green"), (1, "red")),
                searches=(SHARED,),
            )
        )
        .with_panel(
            table_panel(
                ids,
                "Conflicts by kind",
                "Per process and kind: crew, agent, task, tool, llm, task_inputs (a Task "
                "interpolated with another request's inputs).",
                q.sum_by(q.by(q.INSTANCE, q.SHARED_KIND), conflicts),
                searches=(SHARED,),
            )
        )
        .with_panel(
            ts(
                ids,
                "New conflicts by kind",
                "Conflicts per interval. They happen only while kickoffs overlap (below).",
                [
                    query(
                        q.sum_by(
                            q.by(q.SHARED_KIND), q.increase(q.SHARED_CONFLICTS, window=q.RATE)
                        ),
                        q.legend(q.SHARED_KIND),
                    )
                ],
                "short",
                searches=(SHARED,),
                bars=True,
            )
        )
        .with_panel(
            ts(
                ids,
                "Answers carrying another request's data",
                "Runs per second that received another in-flight request's data "
                "(crew_otel.crosstalk), by where it entered (tool_result, model_input, output) "
                "and workflow: a data leak between users, whatever shared it. The traces: "
                "crew_otel.crosstalk=true on the kickoff span.",
                [
                    query(
                        q.sum_by(q.by(q.CROSSTALK_SOURCE, q.WORKFLOW), q.rate(q.CROSSTALK)),
                        q.legend(q.CROSSTALK_SOURCE, q.WORKFLOW),
                    )
                ],
                "reqps",
                searches=(CROSSTALK,),
            )
        )
        .with_panel(
            ts(
                ids,
                "Kickoffs in flight",
                "Concurrency at the time of the conflicts.",
                [query(q.sum_by(q.JOB, q.sel(q.KICKOFFS_ACTIVE)), q.legend())],
                "short",
                searches=(SHARED,),
            )
        )
    )
