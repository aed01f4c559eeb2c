"""One plan: ``crew-otel doctor`` says what ``instrument()`` installs, and installation is atomic.

The plan (a dry run: it imports nothing) lists every hook - the targets table, provider LLM
classes, HTTP clients and their connection pools, threads, baggage, shared state. The
instrumentor applies it, so its reports equal the plan row for row. A row that fails to install
is reported and skipped (or, in strict mode, everything installed so far is rolled back): never
a half-installed state that ``uninstrument()`` cannot remove.
"""

from __future__ import annotations

import builtins
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import wrapt
from opentelemetry import propagate
from rich.console import Console

import crew_otel
from crew_otel import targets
from crew_otel.cli import doctor
from crew_otel.config import CrewOtelConfig
from crew_otel.hook_kinds import Layer, Status
from crew_otel.instrumentor import CrewAIInstrumentor
from crew_otel.plan import PlanRow, build_plan
from crew_otel.safety import reset_reported_errors, set_strict
from crew_otel.testing.crews import make_llm, research_crew
from crew_otel.wrappers.tool import ToolRunWrapper
from tests.spans import Spans


class _Frozen(type):
    """A metaclass refusing attribute assignment: hooking a method of its classes fails."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is frozen")


class FrozenTool(metaclass=_Frozen):
    def run(self) -> str:
        return "ran"


def _refusing_factory(runtime: Any, *, is_async: bool) -> Any:
    raise RuntimeError("this wrapper cannot be built")


FAILING_ROWS = (
    targets.Target(__name__, "FrozenTool.run", ToolRunWrapper, Layer.TOOL),
    targets.Target("crewai.crew", "Crew.train", _refusing_factory, Layer.KICKOFF),
)


def rows(items: list[PlanRow] | list[Any]) -> list[tuple[str, str, str, str]]:
    return [(r.key, r.layer, r.status, r.detail) for r in items]


def statuses(items: list[PlanRow] | list[Any]) -> list[tuple[str, str, str]]:
    return [(r.key, r.layer, r.status) for r in items]


def hooked_state() -> dict[str, object]:
    """What sits now where any row of the plan (or a failing row) would hook."""
    from crewai import Crew

    state: dict[str, object] = {
        r.key: r.resolved.owner.__dict__[r.resolved.name]
        for r in build_plan().rows
        if r.resolved is not None
    }
    state["Crew.train"] = Crew.__dict__["train"]
    state["FrozenTool.run"] = FrozenTool.__dict__["run"]
    state["Thread.start"] = threading.Thread.__dict__["start"]
    state["open"] = builtins.open
    state["textmap"] = propagate.get_global_textmap()
    return state


def kickoff(fake_provider: Any, marker: str) -> str:
    crew = research_crew(lambda: make_llm(fake_provider.base_url))
    return str(crew.kickoff(inputs={"topic": f"[[{marker}]]"}).raw)


def concurrent_kickoffs(fake_provider: Any, n: int = 4) -> list[str]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda i: kickoff(fake_provider, f"k{i}"), range(n)))


def span_shape(exporter: Any) -> Counter[str]:
    """Span names, and the model calls per kickoff: what a normal run records."""
    spans = Spans(exporter.get_finished_spans())
    shape = Counter(s.name for s in exporter.get_finished_spans())
    for root in spans.named("invoke_workflow"):
        chats = [s for s in spans.named("chat") if s.context.trace_id == root.context.trace_id]
        shape[f"chats per kickoff: {len(chats)}"] += 1
    assert spans.orphans() == []
    return shape


def test_doctor_lists_what_instrument_installs(otel_tracer_provider, fake_provider):
    """The dry run equals instrument()'s reports row for row - provider classes, HTTP pools and
    the modules CrewAI imports on first use (pending in both) included."""
    import httpcore
    from crewai.llms.base_llm import BaseLLM

    class EchoLLM(BaseLLM):  # a custom provider class: found by the plan, hooked by instrument()
        def call(self, *args: Any, **kwargs: Any) -> str:
            return "echo"

    crew_otel.uninstrument()
    plan = build_plan(CrewOtelConfig.resolve({}))
    instrumentor = crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        reports = instrumentor.reports
        assert rows(reports) == rows(list(plan.rows))
        by_key = {r.key: r.status for r in reports}
        assert by_key[f"{__name__}:{EchoLLM.__qualname__}.call"] == Status.INSTALLED
        assert by_key["httpcore:ConnectionPool.handle_request"] == Status.INSTALLED
        assert by_key["httpcore:AsyncConnectionPool.handle_async_request"] == Status.INSTALLED
        assert by_key["crewai.crew:Crew.kickoff"] == Status.INSTALLED
        assert by_key["threading"] == Status.INSTALLED
        # every row said installed is hooked, exactly there
        for row in plan.rows:
            if row.status == Status.INSTALLED and row.resolved is not None:
                current = row.resolved.owner.__dict__[row.resolved.name]
                assert isinstance(current, wrapt.FunctionWrapper), row.key
                assert current.__wrapped__ is row.resolved.original, row.key
        assert isinstance(EchoLLM.__dict__["call"], wrapt.FunctionWrapper)
        assert isinstance(httpcore.ConnectionPool.__dict__["handle_request"], wrapt.FunctionWrapper)
        # a module imported by CrewAI on first use: pending in the plan and in the reports
        if "crewai.lite_agent" not in sys.modules:
            assert by_key["crewai.lite_agent:LiteAgent.kickoff"] == Status.PENDING

        # doctor, in the same process state: its dry run and the installed hooks
        assert statuses(doctor.hook_statuses()) == statuses(reports)
        console = Console(record=True, width=400, color_system=None)
        doctor.run(console)
        output = console.export_text()
        assert "Hooks installed by instrument() in this process" in output
        for report in reports:
            assert report.key in output
    finally:
        crew_otel.uninstrument()
    assert not isinstance(EchoLLM.__dict__["call"], wrapt.FunctionWrapper)


@pytest.fixture
def failing_rows(otel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows that cannot install, among the others (after ``otel`` instrumented without)."""
    middle = len(targets.TARGETS) // 2
    table = (*targets.TARGETS[:middle], *FAILING_ROWS, *targets.TARGETS[middle:])
    monkeypatch.setattr(targets, "TARGETS", table)


def test_a_failing_row_is_reported_and_skipped_and_uninstrument_leaves_a_clean_state(
    otel, otel_tracer_provider, span_exporter, fake_provider, failing_rows, monkeypatch
):
    concurrent_kickoffs(fake_provider)
    normal = span_shape(span_exporter)
    crew_otel.uninstrument()
    before = hooked_state()

    set_strict(False)  # the application's mode: a failing row is logged, not raised
    reset_reported_errors()
    try:
        instrumentor = crew_otel.instrument(tracer_provider=otel_tracer_provider)
    finally:
        set_strict(True)
    try:
        assert instrumentor.is_instrumented_by_opentelemetry
        by_key = {r.key: r for r in instrumentor.reports}
        assert by_key[f"{__name__}:FrozenTool.run"].status == Status.FAILED
        assert "frozen" in by_key[f"{__name__}:FrozenTool.run"].detail
        assert by_key["crewai.crew:Crew.train"].status == Status.FAILED
        assert "cannot be built" in by_key["crewai.crew:Crew.train"].detail
        after_failures = targets.TARGETS[targets.TARGETS.index(FAILING_ROWS[-1]) + 1 :]
        assert any(by_key[t.key].status == Status.INSTALLED for t in after_failures)
        # nothing of the failed rows is installed
        assert hooked_state()["Crew.train"] is before["Crew.train"]
        assert hooked_state()["FrozenTool.run"] is before["FrozenTool.run"]
        span_exporter.clear()
        concurrent_kickoffs(fake_provider)
        assert span_shape(span_exporter) == normal, "the other rows work"
    finally:
        crew_otel.uninstrument()
    assert_clean(before)
    monkeypatch.setattr(
        targets, "TARGETS", tuple(t for t in targets.TARGETS if t not in FAILING_ROWS)
    )
    assert_instrument_works_again(otel_tracer_provider, span_exporter, fake_provider, normal)


def test_an_error_out_of_instrument_rolls_back_everything_installed_so_far(
    otel, otel_tracer_provider, span_exporter, fake_provider, failing_rows, monkeypatch
):
    """Strict mode raises the row's error out of instrument(): what was installed before it is
    removed at once (BaseInstrumentor never marks the instrumentor instrumented, so a later
    uninstrument() would remove nothing)."""
    concurrent_kickoffs(fake_provider)
    normal = span_shape(span_exporter)
    crew_otel.uninstrument()
    before = hooked_state()
    with pytest.raises(AttributeError, match="frozen"):
        crew_otel.instrument(tracer_provider=otel_tracer_provider)
    assert not CrewAIInstrumentor().is_instrumented_by_opentelemetry
    assert CrewAIInstrumentor().runtime is None
    assert_clean(before)
    crew_otel.uninstrument()
    assert_clean(before)
    monkeypatch.setattr(
        targets, "TARGETS", tuple(t for t in targets.TARGETS if t not in FAILING_ROWS)
    )
    assert_instrument_works_again(otel_tracer_provider, span_exporter, fake_provider, normal)


def assert_clean(before: dict[str, object]) -> None:
    after = hooked_state()
    changed = [key for key in before if after.get(key) is not before[key]]
    assert changed == [], "every original restored"
    assert not CrewAIInstrumentor().is_instrumented_by_opentelemetry


def assert_instrument_works_again(
    tracer_provider: Any, exporter: Any, fake_provider: Any, normal: Counter[str]
) -> None:
    """instrument() again: concurrent kickoffs record what they recorded before."""
    instrumentor = crew_otel.instrument(tracer_provider=tracer_provider)
    try:
        assert instrumentor.is_instrumented_by_opentelemetry
        assert Status.FAILED not in {r.status for r in instrumentor.reports}
        exporter.clear()
        outputs = concurrent_kickoffs(fake_provider)
        assert all(f"[[k{i}]]" in out for i, out in enumerate(outputs))
        assert span_shape(exporter) == normal
    finally:
        crew_otel.uninstrument()
