"""Hostile input to the instrumentation never changes the user's results (content capture on).

Plus property-based tests of the attribute, truncation and redaction functions.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crew_otel
from crew_otel import content
from crew_otel.testing.crews import make_llm, research_crew

LIMIT = 1024
HUGE = "x" * 10_000_000


class Hostile:
    """An object whose __repr__ and __str__ raise."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __str__(self) -> str:
        raise RuntimeError("no str")


def cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    value["self"] = value
    return value


@pytest.fixture
def capturing(otel_tracer_provider, span_exporter, meter_provider):
    crew_otel.uninstrument()
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider,
        meter_provider=meter_provider,
        capture_content=True,
        max_attribute_length=LIMIT,
    )
    yield span_exporter
    crew_otel.uninstrument()


def content_attributes(spans) -> list[str]:
    keys = (
        "crewai.kickoff.inputs",
        "crewai.task.description",
        "crewai.task.output",
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
    )
    return [v for s in spans for k, v in s.attributes.items() if k in keys]


INPUTS = {
    "object": object(),
    "cyclic": cyclic(),
    "bytes": b"\x00\xff" * 10,
    "hostile": Hostile(),
    "huge": HUGE,
    "nested": [1, {"b": [2.5, None, True]}],
}


def kickoff_outcome(fake_provider, value: Any) -> tuple[str, str]:
    try:
        result = research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
            inputs={"topic": "[[odd]]", "extra": value}
        )
        return "ok", result.raw
    except BaseException as exc:  # CrewAI rejects some of these itself
        return type(exc).__name__, str(exc)[:200]


def test_odd_kickoff_inputs_behave_exactly_as_without_instrumentation(
    fake_provider, otel_tracer_provider, meter_provider, caplog
):
    crew_otel.uninstrument()
    expected = {name: kickoff_outcome(fake_provider, value) for name, value in INPUTS.items()}
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider,
        meter_provider=meter_provider,
        capture_content=True,
        max_attribute_length=LIMIT,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="crew_otel"), ThreadPoolExecutor(3) as pool:
            outcomes = dict(
                zip(INPUTS, pool.map(lambda v: kickoff_outcome(fake_provider, v), INPUTS.values()))
            )
    finally:
        crew_otel.uninstrument()
    assert outcomes == expected
    assert expected["huge"][0] == "ok"
    assert expected["nested"][0] == "ok"
    assert [r for r in caplog.records if r.name == "crew_otel"] == [], "no warning flood"


RESULTS = {
    "none": None,
    "huge": HUGE,
    "bytes": b"\x00\xff" * 1000,
    "cyclic": cyclic(),
    "hostile": Hostile(),
    "object": object(),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_tool_results_and_arguments_are_returned_unchanged(capturing, name, caplog):
    from crewai.tools import tool

    returned = RESULTS[name]

    @tool("odd_tool")
    def odd_tool(query: Any) -> Any:
        """Returns something odd."""
        return returned

    with caplog.at_level(logging.WARNING, logger="crew_otel"), ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda arg: odd_tool.run(query=arg), [RESULTS[name], HUGE, Hostile(), cyclic()]
            )
        )
    assert all(r is returned for r in results), "the user's result, the same object"
    spans = capturing.get_finished_spans()
    assert len(spans) == 4
    recorded = content_attributes(spans)
    assert len(recorded) == 8
    assert all(len(v) <= LIMIT for v in recorded)
    assert not [r for r in caplog.records if r.name == "crew_otel"]


def generator_tool_outcome() -> tuple[str, str]:
    from crewai.tools import tool

    @tool("streaming_tool")
    def streaming_tool(query: str) -> Any:
        """Returns a generator."""
        return (f"chunk {i}" for i in range(3))

    try:
        return "ok", repr(list(streaming_tool.run(query="x")))
    except Exception as exc:  # CrewAI mistakes a generator for a coroutine
        return type(exc).__name__, str(exc)


def test_generator_results_behave_as_without_instrumentation(
    otel_tracer_provider, span_exporter, meter_provider
):
    crew_otel.uninstrument()
    expected = generator_tool_outcome()
    crew_otel.instrument(
        tracer_provider=otel_tracer_provider, meter_provider=meter_provider, capture_content=True
    )
    try:
        assert generator_tool_outcome() == expected
    finally:
        crew_otel.uninstrument()
    (span,) = span_exporter.get_finished_spans()
    assert span.name == "execute_tool streaming_tool"


def test_huge_tool_result_inside_a_run_is_truncated(capturing, fake_provider):
    from crewai.tools import tool

    @tool("bulk_lookup")
    def bulk_lookup(query: str) -> str:
        """Returns ten megabytes."""
        return HUGE

    research_crew(lambda: make_llm(fake_provider.base_url), tools=[bulk_lookup]).kickoff(
        inputs={"topic": "[[bulk]]"}
    )
    recorded = content_attributes(capturing.get_finished_spans())
    assert recorded
    assert all(len(v) <= LIMIT for v in recorded)
    assert any(v.endswith(content.TRUNCATION_MARK) for v in recorded)


# --- properties of the pure functions -------------------------------------------------------

SECRET_TAIL = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    min_size=20,
    max_size=60,
)
SECRETS = st.one_of(
    SECRET_TAIL.map(lambda t: f"sk-{t}"),
    SECRET_TAIL.map(lambda t: f"sk-proj-{t}"),
    SECRET_TAIL.map(lambda t: f"sk-ant-api03-{t}"),
)
FILLER = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary()),
    lambda children: st.one_of(
        st.lists(children, max_size=8),
        st.dictionaries(st.text(max_size=10), children, max_size=8),
        st.tuples(children, children),
    ),
    max_leaves=50,
)
LIMITS = st.integers(min_value=16, max_value=4096)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(VALUES, LIMITS)
def test_render_never_raises_and_respects_the_limit(value, limit):
    text = content.render(value, limit)
    assert isinstance(text, str)
    assert len(text) <= limit


@FAST
@given(FILLER, LIMITS)
def test_truncate(text, limit):
    out = content.truncate(text, limit)
    assert len(out) <= limit
    if len(text) <= limit:
        assert out == text
    else:
        assert out.endswith(
            content.TRUNCATION_MARK[: limit - max(limit - len(content.TRUNCATION_MARK), 0)]
        )
        assert text.startswith(out[: max(limit - len(content.TRUNCATION_MARK), 0)])


@FAST
@given(FILLER, SECRETS, FILLER)
def test_redact_removes_api_keys_anywhere(before, secret, after):
    text = f"{before} {secret} {after}"
    out = content.redact(text)
    assert secret not in out
    if secret[8:] not in before + after:
        assert secret[8:] not in out, "no long remainder of the key either"
    assert content.redact(out) == out, "idempotent"


@FAST
@given(
    st.sampled_from(
        ["password", "passwd", "api_key", "api-key", "Authorization", "token", "client_secret"]
    ),
    st.sampled_from(["=", ": ", '="', '": "']),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!@#$%^*", min_size=6, max_size=40),
)
def test_redact_credential_values(key, separator, value):
    out = content.redact(f"config {key}{separator}{value} end")
    assert value not in out
    assert key in out, "the key name is kept, so a reader knows what was removed"


@FAST
@given(FILLER, SECRETS, LIMITS)
def test_render_never_leaks_a_secret_even_when_cut(prefix, secret, limit):
    text = content.render(f"{prefix} {secret}", limit)
    assert secret not in text
    # not even a prefix of it long enough to be useful survives a cut
    if secret[:16] not in prefix:
        assert secret[:16] not in text


@FAST
@given(VALUES)
def test_render_of_hostile_and_cyclic_objects(value):
    for odd in (Hostile(), cyclic(), [value, Hostile()], {"v": value, "c": cyclic()}):
        assert len(content.render(odd, 64)) <= 64


def test_recursion_limit_is_not_touched():
    before = sys.getrecursionlimit()
    nested: Any = []
    for _ in range(10_000):
        nested = [nested]
    assert len(content.render(nested, 100)) <= 100
    assert sys.getrecursionlimit() == before
