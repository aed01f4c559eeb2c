"""The instrumentation never breaks the application.

The user's exceptions reach the user as the same object; an internal error in a wrapper is
logged once and never changes the result of the call (tested by forcing internal errors).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from crew_otel import attributes, content
from crew_otel.diagnosis import errors
from crew_otel.safety import set_strict
from crew_otel.testing.crews import make_llm, make_lookup_tool, research_crew
from tests.spans import Spans


class AppError(Exception):
    pass


def test_user_exception_from_kickoff_is_the_same_object_threads_and_asyncio(otel, fake_provider):
    raised: list[AppError] = []

    def before_kickoff(inputs):
        error = AppError(f"rejected {inputs['topic']}")
        raised.append(error)
        raise error

    def make_crew():
        return research_crew(
            lambda: make_llm(fake_provider.base_url), before_kickoff_callbacks=[before_kickoff]
        )

    def run(i: int) -> AppError:
        with pytest.raises(AppError) as info:
            make_crew().kickoff(inputs={"topic": f"[[r{i}]]"})
        return info.value

    with ThreadPoolExecutor(max_workers=4) as pool:
        caught = list(pool.map(run, range(4)))

    async def main() -> list[BaseException]:
        results = await asyncio.gather(
            *(make_crew().akickoff(inputs={"topic": f"[[ar{i}]]"}) for i in range(3)),
            return_exceptions=True,
        )
        return list(results)

    caught_async = asyncio.run(main())
    assert len(raised) == 7
    assert all(any(c is r for r in raised) for c in [*caught, *caught_async])
    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    assert len(roots) == 7
    assert all(r.attributes["error.type"] == "AppError" for r in roots)


def test_tool_exception_called_directly_is_the_same_object(otel):
    from crewai.tools import tool

    boom = ValueError("boom")

    @tool("exploding")
    def exploding(query: str) -> str:
        """Always raises."""
        raise boom

    with pytest.raises(ValueError) as info:
        exploding.run(query="x")
    assert info.value is boom
    (span,) = otel.get_finished_spans()
    assert span.name == "execute_tool exploding"
    assert span.attributes["error.type"] == "ValueError"


def test_base_exceptions_pass_through_untouched(otel, fake_provider):
    from crewai.tools import tool

    @tool("interrupting")
    def interrupting(query: str) -> str:
        """Raises KeyboardInterrupt."""
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupting.run(query="x")
    (span,) = otel.get_finished_spans()
    assert span.attributes["error.type"] == "KeyboardInterrupt"
    assert span.end_time is not None


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (attributes, "kickoff_attributes"),
        (attributes, "task_attributes"),
        (attributes, "agent_attributes"),
        (attributes, "llm_attributes"),
        (attributes, "usage_attributes"),
        (attributes, "tool_attributes"),
        (content, "render"),
    ],
)
def test_internal_error_never_changes_the_result(
    otel, fake_provider, monkeypatch, caplog, module, name
):
    set_strict(False)
    try:
        # reference result without the fault
        expected = [
            research_crew(lambda: make_llm(fake_provider.base_url))
            .kickoff(inputs={"topic": f"[[ok{i}]]"})
            .raw
            for i in range(2)
        ]

        def broken(*args, **kwargs):
            raise RuntimeError(f"forced internal error in {name}")

        monkeypatch.setattr(module, name, broken)
        otel.clear()

        def run(i: int) -> str:
            crew = research_crew(
                lambda: make_llm(fake_provider.base_url), tools=[make_lookup_tool()]
            )
            return crew.kickoff(inputs={"topic": f"[[ok{i}]]"}).raw

        with (
            caplog.at_level(logging.DEBUG, logger="crew_otel"),
            ThreadPoolExecutor(max_workers=2) as pool,
        ):
            results = list(pool.map(run, range(2)))
        assert results == expected
        warnings = [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and "internal error" in r.getMessage()
        ]
        if name != "render":  # content capture is off: render is never called
            places = [w.args[0] for w in warnings]
            assert places, "the internal error was reported"
            assert len(places) == len(set(places)), "logged once per place, not per call"
            assert all(f"forced internal error in {name}" in str(w.exc_info[1]) for w in warnings)
    finally:
        set_strict(True)


def test_internal_error_while_recording_a_failure_keeps_the_users_exception(otel, monkeypatch):
    from crewai.tools import tool

    set_strict(False)
    try:
        monkeypatch.setattr(errors, "run_key", lambda span, kickoff=None: 1 / 0)
        boom = LookupError("user error")

        @tool("failing")
        def failing(query: str) -> str:
            """Raises the user's error."""
            raise boom

        with pytest.raises(LookupError) as info:
            failing.run(query="x")
        assert info.value is boom
        (span,) = otel.get_finished_spans()
        assert span.end_time is not None, "the span still ended"
    finally:
        set_strict(True)
