"""Retries: where retries pile up, per layer and provider, and what each kickoff costs."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common as cm

from . import promql as q
from .grafana import (
    ANY_ORIGIN,
    ORIGINS_OF_SERIES,
    RECOVERED,
    Ids,
    base_dashboard,
    query,
    row,
    table_panel,
    thresholds,
    ts,
)

KICKOFF_RATE = q.sum_by(q.JOB, q.rate(q.WORKFLOW_DURATION.count))


def build() -> db.Dashboard:
    """The Retries dashboard."""
    ids = Ids()
    retries = q.rate(q.RETRIES)
    return (
        base_dashboard(
            "crew-otel-retries",
            "crew_otel / Retries",
            "Where retries pile up: per layer (HTTP, rate limit, agent re-execution), per "
            "provider, and how many retries each kickoff costs.",
        )
        .with_row(row(ids, "Retries"))
        .with_panel(
            ts(
                ids,
                "Retries by layer",
                "crew_otel.retries by layer: http (SDK resends, http.request.resend_count), "
                "rate_limit (CrewAI's rate-limit retry), agent (CrewAI re-ran the agent, "
                "crew_otel.attempt >= 2).",
                [query(q.sum_by(q.by(q.RETRY_LAYER), retries), q.legend(q.RETRY_LAYER))],
                "ops",
                searches=(RECOVERED,),
            )
        )
        .with_panel(
            ts(
                ids,
                "Retries by provider and error",
                "HTTP and rate-limit retries per model provider and the error that caused them.",
                [
                    query(
                        q.sum_by(
                            q.by(q.PROVIDER, q.ERROR_TYPE), q.rate(q.RETRIES, q.NOT_AGENT_RETRY)
                        ),
                        q.legend(q.PROVIDER, q.ERROR_TYPE),
                    )
                ],
                "ops",
                searches=(ORIGINS_OF_SERIES,),
            )
        )
        .with_row(row(ids, "Amplification"))
        .with_panel(
            ts(
                ids,
                "Retry amplification (retries per kickoff)",
                "All retries divided by completed kickoffs. Above 3 for 10 minutes fires "
                "CrewOtelRetryAmplification: each user request costs several provider calls.",
                [query(q.ratio(q.sum_by(q.JOB, retries), KICKOFF_RATE), q.legend())],
                "short",
                searches=(RECOVERED,),
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
                        q.sum_by(q.by(q.RETRY_LAYER), retries)
                        + f" / on ({q.JOB}) group_left () {KICKOFF_RATE}",
                        q.legend(q.RETRY_LAYER),
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
                        q.ratio(q.sum_by(q.JOB, q.rate(q.OPERATION_DURATION.count)), KICKOFF_RATE),
                        q.legend(),
                    )
                ],
                "short",
            )
        )
        .with_panel(
            ts(
                ids,
                "HTTP attempts by status and host",
                "Every HTTP attempt to the providers, retries included, from the httpx "
                "instrumentation: http.client.request.duration (stable HTTP conventions) or, "
                "by default, http.client.duration (old conventions, no host label). A process "
                "sending both (OTEL_SEMCONV_STABILITY_OPT_IN=http/dup) counts once.",
                [
                    query(
                        q.http_attempts(q.by(q.HTTP_SERVER_ADDRESS, q.HTTP_STATUS)),
                        q.legend(q.HTTP_SERVER_ADDRESS, q.HTTP_STATUS),
                    )
                ],
                "ops",
                searches=(ANY_ORIGIN,),
            )
        )
        .with_row(row(ids, "Totals"))
        .with_panel(
            table_panel(
                ids,
                "Retries in the time range",
                "Total retries per service, layer and provider over the selected time range.",
                q.sum_by(q.by(q.RETRY_LAYER, q.PROVIDER), q.increase(q.RETRIES)),
                span=24,
                searches=(RECOVERED,),
            )
        )
    )
