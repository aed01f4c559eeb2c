"""Every metric instrument crew_otel records, created once per meter provider.

Names, units and attributes are public (dashboards and alert rules use them); GenAI
semantic-convention names where they exist, ``crew_otel.*`` for the rest. Values are recorded
from the wrappers that make the spans, while the span's context is current, so the SDK's
trace-based exemplar filter attaches the trace and span ID to each point.

Metric attributes are bounded: operation, provider, model, workflow/agent/tool names (code-defined),
``error.type`` and crew_otel's enums. Never request IDs, trace IDs or user text.

Names are code-defined but not always few (a Flow named ``ticket-{id}``, a tool per MCP server
command), so every value of a name attribute (:data:`NAME_ATTRIBUTES`) passes through one
:class:`NameCap` on its way into any instrument: the first :data:`MAX_NAME_VALUES` distinct
values per attribute keep their name (cut to :data:`MAX_NAME_VALUE_LENGTH` characters), later
ones are recorded as :data:`OVERFLOW_VALUE`. The in-flight count keeps no entry for a name with
nothing in flight for long: an entry that returns to 0 reports 0 for
:data:`IDLE_SERIES_SECONDS` (so dashboards and alerts see the count go back to 0, and a name
that runs again soon keeps one series), then is dropped (so ``ticket-{id}`` flows cost nothing
once idle).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Protocol

from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.util.types import AttributeValue

from crew_otel import attributes as a
from crew_otel import semconv
from crew_otel.context import current_context_reader

# Names of the instruments (OpenTelemetry names; Prometheus translates "." to "_" and adds
# the unit and "_total" suffixes, e.g. crew_otel.retries -> crew_otel_retries_total).
OPERATION_DURATION = "gen_ai.client.operation.duration"
TOKEN_USAGE = "gen_ai.client.token.usage"
#: Renamed from ``gen_ai.workflow.duration`` in the GenAI semantic conventions.
WORKFLOW_DURATION = "gen_ai.invoke_workflow.duration"
AGENT_DURATION = "gen_ai.invoke_agent.duration"
TOOL_DURATION = "gen_ai.execute_tool.duration"
KICKOFFS_ACTIVE = "crew_otel.kickoffs.active"
KICKOFF_QUEUE_WAIT = "crew_otel.kickoff.queue_wait"
RETRIES = "crew_otel.retries"
ERROR_ORIGINS = "crew_otel.error.origins"
SHARED_INSTANCE_CONFLICTS = "crew_otel.shared_instance.conflicts"
CROSSTALK = "crew_otel.crosstalk"
FAILURES = "crew_otel.failures"

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
    CROSSTALK,
    FAILURES,
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
#: The conventions' boundaries for ``gen_ai.invoke_workflow.duration`` (whole kickoffs).
WORKFLOW_DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
#: The conventions' boundaries for ``gen_ai.invoke_agent.duration`` (0.1 s doubling to 409.6 s).
AGENT_DURATION_BUCKETS = tuple(round(0.1 * 2**i, 1) for i in range(13))
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

#: Metric attributes whose values come from names (code-defined, but unbounded in number).
NAME_ATTRIBUTES = frozenset(
    {
        a.GEN_AI_WORKFLOW_NAME,
        a.GEN_AI_AGENT_NAME,
        a.GEN_AI_TOOL_NAME,
        a.GEN_AI_REQUEST_MODEL,
        a.GEN_AI_PROVIDER_NAME,
    }
)
#: The same, as a tuple: iterated at every metric point.
_NAME_ATTRIBUTE_KEYS = tuple(NAME_ATTRIBUTES)
#: Distinct values per name attribute that keep their name, per process (meter provider).
MAX_NAME_VALUES = 100
#: Longest name value recorded (the same cut as span names).
MAX_NAME_VALUE_LENGTH = a.MAX_NAME_LENGTH
#: The value recorded instead of a name beyond :data:`MAX_NAME_VALUES`.
OVERFLOW_VALUE = "_other"
#: How long a workflow with nothing in flight keeps reporting 0 before its series is dropped
#: (it is reported as 0 at least once either way).
IDLE_SERIES_SECONDS = 300.0

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


class NameCap:
    """Caps the values of name attributes: the first ``max_values`` distinct values of each
    attribute keep their name (cut to ``max_length``), later ones become :data:`OVERFLOW_VALUE`.

    A value once admitted stays admitted, so one name always maps to the same series.
    """

    def __init__(
        self, max_values: int = MAX_NAME_VALUES, max_length: int = MAX_NAME_VALUE_LENGTH
    ) -> None:
        self._max_values = max_values
        self._max_length = max_length
        self._admitted: dict[str, set[str]] = {key: set() for key in NAME_ATTRIBUTES}
        self._lock = threading.Lock()

    def value(self, key: str, value: str) -> str:
        """The value to record for name attribute ``key``."""
        text = value[: self._max_length]
        admitted = self._admitted.setdefault(key, set())
        if text in admitted:
            return text
        with self._lock:
            if text in admitted or len(admitted) < self._max_values:
                admitted.add(text)
                return text
        return OVERFLOW_VALUE

    def attributes(self, attributes: Attributes | None) -> Attributes | None:
        """``attributes`` with every name attribute's value capped."""
        if not attributes or NAME_ATTRIBUTES.isdisjoint(attributes):
            return attributes
        capped = dict(attributes)
        # A loop, not a comprehension, and an admitted value without a call of ``value``: this
        # runs at every metric point.
        for key in _NAME_ATTRIBUTE_KEYS:
            val = capped.get(key)
            if isinstance(val, str):
                text = val[: self._max_length]
                admitted = self._admitted.get(key)
                capped[key] = text if admitted and text in admitted else self.value(key, val)
        return capped

    def reset_lock(self) -> None:
        """In a forked child: another parent thread may have held the lock at the fork."""
        self._lock = threading.Lock()


class CappedHistogram:
    """A histogram whose name attributes go through a :class:`NameCap` (the one door)."""

    def __init__(self, histogram: Histogram, cap: NameCap) -> None:
        self._histogram = histogram
        self._cap = cap
        #: The current context, read as the SDK would (for the point's exemplar) in one C call
        #: instead of its two Python ones.
        self._current_context = current_context_reader()

    def record(
        self,
        amount: float,
        attributes: Attributes | None = None,
        context: Context | None = None,
    ) -> None:
        """Record ``amount`` with capped name attributes."""
        self._histogram.record(
            amount,
            self._cap.attributes(attributes),
            context if context is not None else self._current_context(),
        )


class CrewOtelMetrics:
    """The instruments, plus the exact in-process count of kickoffs in flight."""

    def __init__(self, meter: Meter) -> None:
        self.names = NameCap()
        self.operation_duration = self._histogram(
            meter, OPERATION_DURATION, "Duration of GenAI operations (model calls)."
        )
        self.token_usage = self._histogram(
            meter,
            TOKEN_USAGE,
            "Tokens used per model call, by token type.",
            unit="{token}",
            buckets=TOKEN_BUCKETS,
        )
        self.workflow_duration = self._histogram(
            meter,
            WORKFLOW_DURATION,
            "Duration of GenAI workflows: crew/flow/agent kickoffs.",
            buckets=WORKFLOW_DURATION_BUCKETS,
        )
        self.agent_duration = self._histogram(
            meter,
            AGENT_DURATION,
            "Duration of agent execution attempts.",
            buckets=AGENT_DURATION_BUCKETS,
        )
        self.tool_duration = self._histogram(meter, TOOL_DURATION, "Duration of tool calls.")
        # Model calls' duration and tokens: the released names, or the GenAI conventions' main
        # under OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental (see crew_otel.semconv).
        self.inference_duration = self.operation_duration
        #: Token histograms by token type under the opt-in (``None``: ``token_usage``).
        self.inference_tokens: dict[str, CappedHistogram] | None = None
        if semconv.latest_experimental():
            self.inference_duration = self._histogram(
                meter, semconv.INFERENCE_DURATION_LATEST, "Duration of GenAI inference calls."
            )
            self.inference_tokens = {
                token_type: self._histogram(
                    meter,
                    name,
                    f"{token_type.capitalize()} tokens used per inference call.",
                    unit="{token}",
                    buckets=TOKEN_BUCKETS,
                )
                for token_type, name in (
                    ("input", semconv.INFERENCE_INPUT_TOKENS_LATEST),
                    ("output", semconv.INFERENCE_OUTPUT_TOKENS_LATEST),
                )
            }
        # Kickoffs in flight are counted exactly in-process (the count also goes on each
        # kickoff span) and observed at collection time: no SDK work per kickoff.
        self._in_flight = 0
        self._in_flight_by_workflow: dict[str, int] = {}
        #: When each workflow's count last went to 0 (``time.monotonic``), once reported.
        self._idle_since: dict[str, float] = {}
        self.idle_series_seconds = IDLE_SERIES_SECONDS
        self._in_flight_lock = threading.Lock()
        self.kickoffs_active = meter.create_observable_up_down_counter(
            KICKOFFS_ACTIVE,
            callbacks=[self._observe_in_flight],
            unit="{kickoff}",
            description="Kickoffs in flight in this process.",
        )
        self.queue_wait = self._histogram(
            meter,
            KICKOFF_QUEUE_WAIT,
            "Wait between an async kickoff being called and its work starting.",
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
        self.failed_runs = meter.create_counter(
            FAILURES,
            unit="{run}",
            description="Runs whose exception reached the caller, by cause.",
        )
        self.crosstalk_runs = meter.create_counter(
            CROSSTALK,
            unit="{run}",
            description="Runs that received another in-flight request's data, by where it entered.",
        )
        reset_in_forked_children(self)

    def _histogram(
        self,
        meter: Meter,
        name: str,
        description: str,
        unit: str = "s",
        buckets: tuple[float, ...] = DURATION_BUCKETS,
    ) -> CappedHistogram:
        """A histogram of ``meter`` (a duration in seconds unless told otherwise)."""
        created = meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )
        return CappedHistogram(created, self.names)

    def _reset_after_fork(self) -> None:
        """In a forked child: none of the parent's kickoffs are in flight here."""
        self._in_flight_lock = threading.Lock()
        self.names.reset_lock()
        self._in_flight = 0
        # reported as 0 once (the child's series start from the parent's names), then dropped
        self._in_flight_by_workflow = dict.fromkeys(self._in_flight_by_workflow, 0)
        self._idle_since = {}

    # --- kickoffs in flight --------------------------------------------------------------
    def kickoff_started(self, workflow: str) -> int:
        """Count a kickoff in; returns the number in flight including this one."""
        name = self.names.value(a.GEN_AI_WORKFLOW_NAME, workflow)
        with self._in_flight_lock:
            self._in_flight += 1
            by_workflow = self._in_flight_by_workflow
            by_workflow[name] = by_workflow.get(name, 0) + 1
            return self._in_flight

    def kickoff_ended(self, workflow: str) -> None:
        """Count a kickoff out (called exactly once per :meth:`kickoff_started`)."""
        name = self.names.value(a.GEN_AI_WORKFLOW_NAME, workflow)
        with self._in_flight_lock:
            count = self._in_flight_by_workflow.get(name, 0)
            if count <= 0:
                return  # started in the parent before this process was forked
            # stays at 0 until the next collection reports it, so the series ends at 0
            self._in_flight_by_workflow[name] = count - 1
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """Kickoffs in flight in this process right now."""
        return self._in_flight

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        # A workflow with nothing in flight reports 0 (at least once) until it has been idle
        # for idle_series_seconds, then is forgotten: its series ends at 0 (not frozen at its
        # last value) and names seen once cost nothing after.
        now = time.monotonic()
        reported: list[tuple[str, int]] = []
        with self._in_flight_lock:
            idle_since = self._idle_since
            for name, count in list(self._in_flight_by_workflow.items()):
                if count > 0:
                    idle_since.pop(name, None)
                elif name not in idle_since:
                    idle_since[name] = now  # reported as 0 now; dropped once idle long enough
                elif now - idle_since[name] >= self.idle_series_seconds:
                    del self._in_flight_by_workflow[name]
                    del idle_since[name]
                    continue
                reported.append((name, count))
        return [Observation(count, {a.GEN_AI_WORKFLOW_NAME: name}) for name, count in reported]

    # --- recording helpers -----------------------------------------------------------------
    def retry(self, layer: str, error_type: str, provider: str | None = None) -> None:
        """Count one retry made by ``layer`` after an error of ``error_type``."""
        attrs: dict[str, AttributeValue] = {a.RETRY_LAYER: layer, a.ERROR_TYPE: error_type}
        if provider:
            attrs[a.GEN_AI_PROVIDER_NAME] = self.names.value(a.GEN_AI_PROVIDER_NAME, provider)
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

    def failure(self, cause: str, workflow: str) -> None:
        """Count one failed run (call while its kickoff span is current: the exemplar)."""
        self._count_run(self.failed_runs, a.FAILURE_CAUSE, cause, workflow)

    def crosstalk(self, source: str, workflow: str) -> None:
        """Count one run that received another request's data at ``source``."""
        self._count_run(self.crosstalk_runs, a.CROSSTALK_SOURCE, source, workflow)

    def _count_run(self, counter: Counter, key: str, value: str, workflow: str) -> None:
        name = self.names.value(a.GEN_AI_WORKFLOW_NAME, workflow)
        counter.add(1, {key: value, a.GEN_AI_WORKFLOW_NAME: name})

    def shared_conflict(self, kind: str) -> None:
        """Count one object used by two requests at once."""
        self.shared_conflicts.add(1, {a.SHARED_INSTANCE_KIND: kind})
