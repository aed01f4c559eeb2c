"""Every metric instrument crew_otel records, created once per meter provider.

Names, units and attributes are public (dashboards and alert rules use them); GenAI
semantic-convention names where they exist, ``crew_otel.*`` for the rest. Values are recorded
from the wrappers that make the spans, while the span's context is current, so the SDK's
trace-based exemplar filter attaches the trace and span ID to each point.

Metric attributes are bounded: operation, provider, model, workflow/agent/tool names (code-defined),
``error.type`` and crew_otel's enums. Never request IDs, trace IDs or user text.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes as a

# Names of the instruments (OpenTelemetry names; Prometheus translates "." to "_" and adds
# the unit and "_total" suffixes, e.g. crew_otel.retries -> crew_otel_retries_total).
OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_USAGE = "gen_ai.client.token.usage"
WORKFLOW_DURATION = "gen_ai.workflow.duration"
AGENT_DURATION = "gen_ai.invoke_agent.duration"
TOOL_DURATION = "gen_ai.execute_tool.duration"
KICKOFFS_ACTIVE = "crew_otel.kickoffs.active"
KICKOFF_QUEUE_WAIT = "crew_otel.kickoff.queue_wait"
RETRIES = "crew_otel.retries"
ERROR_ORIGINS = "crew_otel.error.origins"
SHARED_INSTANCE_CONFLICTS = "crew_otel.shared_instance.conflicts"

INSTRUMENT_NAMES = (
    OPERATION_DURATION,
    TOKEN_USAGE,
    WORKFLOW_DURATION,
    AGENT_DURATION,
    TOOL_DURATION,
    KICKOFFS_ACTIVE,
    KICKOFF_QUEUE_WAIT,
    RETRIES,
    ERROR_ORIGINS,
    SHARED_INSTANCE_CONFLICTS,
)

# Bucket boundaries recommended by the GenAI semantic conventions.
DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)

Attributes = Mapping[str, AttributeValue]

_logger = logging.getLogger("crew_otel")


class ForkAware(Protocol):
    """Holds per-process state that a forked child must not inherit."""

    def _reset_after_fork(self) -> None: ...


# Objects to reset in a forked child; weakly held, so registering never keeps one alive.
_reset_in_child: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def reset_in_forked_children(obj: ForkAware) -> None:
    """Call ``obj._reset_after_fork()`` in every child process forked from now on.

    A child starts with a copy of the parent's in-flight bookkeeping (and possibly a lock some
    other parent thread held at the fork), but none of the parent's runs continue in it.
    """
    _reset_in_child.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_reset_in_child):
        try:
            obj._reset_after_fork()
        except Exception:  # never let bookkeeping break the child
            _logger.debug("crew_otel: reset after fork failed", exc_info=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class CrewOtelMetrics:
    """The instruments, plus the exact in-process count of kickoffs in flight."""

    def __init__(self, meter: Meter) -> None:
        self.operation_duration = meter.create_histogram(
            OPERATION_DURATION,
            unit="s",
            description="Duration of GenAI operations (model calls).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.token_usage = meter.create_histogram(
            TOKEN_USAGE,
            unit="{token}",
            description="Tokens used per model call, by token type.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.workflow_duration = meter.create_histogram(
            WORKFLOW_DURATION,
            unit="s",
            description="Duration of crew/flow/agent kickoffs.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.agent_duration = meter.create_histogram(
            AGENT_DURATION,
            unit="s",
            description="Duration of agent execution attempts.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tool_duration = meter.create_histogram(
            TOOL_DURATION,
            unit="s",
            description="Duration of tool calls.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        # Kickoffs in flight are counted exactly in-process (the count also goes on each
        # kickoff span) and observed at collection time: no SDK work per kickoff.
        self._in_flight = 0
        self._in_flight_by_workflow: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()
        self.kickoffs_active = meter.create_observable_up_down_counter(
            KICKOFFS_ACTIVE,
            callbacks=[self._observe_in_flight],
            unit="{kickoff}",
            description="Kickoffs in flight in this process.",
        )
        self.queue_wait = meter.create_histogram(
            KICKOFF_QUEUE_WAIT,
            unit="s",
            description="Wait between an async kickoff being called and its work starting.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            RETRIES,
            unit="{retry}",
            description="Retries made by each retry layer (HTTP, CrewAI rate limit, agent).",
        )
        self.error_origins = meter.create_counter(
            ERROR_ORIGINS,
            unit="{error}",
            description="Errors by the operation where they originated.",
        )
        self.shared_conflicts = meter.create_counter(
            SHARED_INSTANCE_CONFLICTS,
            unit="{conflict}",
            description="Objects used by two requests at the same time.",
        )
        reset_in_forked_children(self)

    def _reset_after_fork(self) -> None:
        """In a forked child: none of the parent's kickoffs are in flight here."""
        self._in_flight_lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_by_workflow = dict.fromkeys(self._in_flight_by_workflow, 0)

    # --- kickoffs in flight --------------------------------------------------------------
    def kickoff_started(self, workflow: str) -> int:
        """Count a kickoff in; returns the number in flight including this one."""
        with self._in_flight_lock:
            self._in_flight += 1
            by_workflow = self._in_flight_by_workflow
            by_workflow[workflow] = by_workflow.get(workflow, 0) + 1
            return self._in_flight

    def kickoff_ended(self, workflow: str) -> None:
        """Count a kickoff out (called exactly once per :meth:`kickoff_started`)."""
        with self._in_flight_lock:
            count = self._in_flight_by_workflow.get(workflow, 0)
            if count <= 0:
                return  # started in the parent before this process was forked
            self._in_flight_by_workflow[workflow] = count - 1
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """Kickoffs in flight in this process right now."""
        return self._in_flight

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        # Workflows seen once keep reporting (0 when idle): a bounded, code-defined set.
        with self._in_flight_lock:
            counts = list(self._in_flight_by_workflow.items())
        return [Observation(count, {a.GEN_AI_WORKFLOW_NAME: name}) for name, count in counts]

    # --- recording helpers -----------------------------------------------------------------
    def retry(self, layer: str, error_type: str, provider: str | None = None) -> None:
        """Count one retry made by ``layer`` after an error of ``error_type``."""
        attrs: dict[str, AttributeValue] = {a.RETRY_LAYER: layer, a.ERROR_TYPE: error_type}
        if provider:
            attrs[a.GEN_AI_PROVIDER_NAME] = provider
        self.retries.add(1, attrs)

    def origin(self, operation: str, error_type: str, recovered: bool) -> None:
        """Count one error at the operation where it originated."""
        self.error_origins.add(
            1,
            {
                a.ORIGIN_OPERATION: operation,
                a.ERROR_TYPE: error_type,
                a.ERROR_RECOVERED: "true" if recovered else "false",
            },
        )

    def shared_conflict(self, kind: str) -> None:
        """Count one object used by two requests at once."""
        self.shared_conflicts.add(1, {a.SHARED_INSTANCE_KIND: kind})
