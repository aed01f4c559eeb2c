"""What a ``chat`` span learns from the provider's response, under concurrent runs.

The response model (the provider answers with a dated snapshot of the model requested), the
finish reasons (``tool_calls`` then ``stop``; ``error`` when a call got no answer), on every
supported CrewAI version, streamed or not; and ``gen_ai.conversation.compacted`` on the model
calls that use a conversation CrewAI summarised to fit the context window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from crew_otel import attributes as a
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_llm, research_crew
from crew_otel.testing.provider import OUTCOME_TOOL_CALL
from tests.spans import Spans, attr

REQUESTED = "gpt-4o-mini"
ANSWERED = "gpt-4o-mini-2024-07-18"
RUNS = 4  # in threads, and as many again as asyncio tasks, all at once
FAST = 0.01  # retry-after seconds: the SDK's back-off does not slow the test down
NO_FINAL_OUTPUT = "produced no final output"


@pytest.fixture
def snapshot_provider() -> Any:
    """The loopback provider answering ``gpt-4o-mini`` requests as its dated snapshot."""
    with FakeOpenAIProvider(response_models={REQUESTED: ANSWERED}) as provider:
        yield provider


def run_threads_and_tasks(make_crew: Callable[[int], Any], prefix: str) -> list[Any]:
    """RUNS kickoffs in threads and RUNS ``akickoff`` tasks on one loop, at the same time.

    Returns each run's result or the exception it raised (run ``i`` has topic ``[[prefix<i>]]``).
    """
    crews = [make_crew(i) for i in range(2 * RUNS)]

    def inputs(i: int) -> dict[str, str]:
        return {"topic": f"[[{prefix}{i}]]"}

    def run(i: int) -> Any:
        try:
            return crews[i].kickoff(inputs=inputs(i))
        except Exception as exc:
            return exc

    async def tasks() -> list[Any]:
        return await asyncio.gather(
            *(crews[i].akickoff(inputs=inputs(i)) for i in range(RUNS, 2 * RUNS)),
            return_exceptions=True,
        )

    with ThreadPoolExecutor(RUNS + 1) as pool:
        in_loop = pool.submit(asyncio.run, tasks())
        in_threads = list(pool.map(run, range(RUNS)))
        return in_threads + list(in_loop.result())


def warm_up(otel: Any, provider: FakeOpenAIProvider, stream: bool) -> None:
    """One run alone first, as a service's first request, then forget what it left.

    The OpenAI SDK's response models build their pydantic schemas lazily, at first use; pydantic
    2.11's lazy build is not thread-safe, so a first burst of concurrent calls can fail one with
    "BaseModel cannot be instantiated directly" (uninstrumented too), and CrewAI calls the model
    again: one request more than this test counts.
    """
    research_crew(lambda: make_llm(provider.base_url, stream=stream)).kickoff(
        inputs={"topic": "[[warmup]]"}
    )
    provider.reset()
    otel.clear()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_spans_carry_the_response_model_and_finish_reasons(otel, snapshot_provider, stream):
    provider = snapshot_provider
    warm_up(otel, provider, stream)
    results = run_threads_and_tasks(
        lambda i: research_crew(lambda: make_llm(provider.base_url, stream=stream)), "r"
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    requests = [r for r in provider.requests if r.path.endswith("/chat/completions")]
    assert len(requests) == 3 * 2 * RUNS  # tool call + answer (researcher), answer (writer)
    assert all(r.stream is stream for r in requests)
    expected = sorted("tool_calls" if r.outcome == OUTCOME_TOOL_CALL else "stop" for r in requests)
    assert expected.count("tool_calls") == 2 * RUNS

    chats = Spans(otel.get_finished_spans()).named("chat")
    assert len(chats) == len(requests)
    for chat in chats:
        assert chat.name == f"chat {REQUESTED}"
        assert attr(chat, a.GEN_AI_REQUEST_MODEL) == REQUESTED
        assert attr(chat, a.GEN_AI_RESPONSE_MODEL) == ANSWERED
        assert str(attr(chat, a.GEN_AI_RESPONSE_ID)).startswith("chatcmpl-")
        assert attr(chat, a.GEN_AI_USAGE_OUTPUT_TOKENS) > 0
    finish_reasons = [attr(chat, a.GEN_AI_RESPONSE_FINISH_REASONS) for chat in chats]
    assert all(isinstance(reasons, tuple) and len(reasons) == 1 for reasons in finish_reasons)
    assert sorted(reasons[0] for reasons in finish_reasons) == expected


def _single_agent_crew(provider: FakeOpenAIProvider, **agent_kwargs: Any) -> Any:
    from crewai import Crew, Task

    agent = make_agent(make_llm(provider.base_url), "Writer", **agent_kwargs)
    task = Task(description="Write about {topic}", expected_output="text", agent=agent)
    return Crew(agents=[agent], tasks=[task])


def test_a_call_that_got_no_answer_finishes_with_error_and_names_no_response_model(
    otel, snapshot_provider
):
    provider = snapshot_provider
    for i in range(2 * RUNS):
        # 500 until every retry layer gave up: the SDK's 2 retries, the agent's 1 re-run
        provider.script(*[Fault.error(500, retry_after=FAST)] * 6, key=f"f{i}")
    results = run_threads_and_tasks(lambda i: _single_agent_crew(provider, max_retry_limit=1), "f")
    assert all(isinstance(r, Exception) for r in results)
    assert provider.stats()["by_status"] == {"500": 6 * 2 * RUNS}

    chats = Spans(otel.get_finished_spans()).named("chat")
    assert len(chats) == 2 * 2 * RUNS  # one per agent attempt
    for chat in chats:
        assert chat.status.status_code is StatusCode.ERROR
        assert attr(chat, a.ERROR_TYPE) == "500"
        assert attr(chat, a.GEN_AI_RESPONSE_FINISH_REASONS) == ("error",)
        assert attr(chat, a.GEN_AI_RESPONSE_MODEL) is None
        assert attr(chat, a.GEN_AI_RESPONSE_ID) is None


def test_calls_after_context_window_summarisation_are_marked_compacted(otel, snapshot_provider):
    provider = snapshot_provider
    for i in range(2 * RUNS):
        provider.script(Fault.context_length_exceeded(), key=f"cw{i}")
    results = run_threads_and_tasks(
        lambda i: _single_agent_crew(provider, respect_context_window=True), "cw"
    )
    assert not [r for r in results if isinstance(r, BaseException)]

    spans = Spans(otel.get_finished_spans())
    agents = spans.named("invoke_agent")
    assert len(agents) == 2 * RUNS
    # CrewAI >= 1.14 ends the agent's loop after summarising (a placeholder answer); older
    # versions go on with a model call on the summary.
    placeholders = sum(NO_FINAL_OUTPUT in r.raw for r in results)
    assert placeholders in (0, 2 * RUNS)
    for agent in agents:
        assert attr(agent, a.GEN_AI_CONVERSATION_COMPACTED) is True
        chats = [s for s in spans.descendants(agent) if s.name.startswith("chat ")]
        chats.sort(key=lambda s: s.start_time or 0)
        rejected, *rest = chats
        # the rejected call and the summary calls saw the whole conversation
        assert attr(rejected, a.ERROR_TYPE) == "400"
        assert attr(rejected, a.GEN_AI_RESPONSE_FINISH_REASONS) == ("error",)
        assert attr(rejected, a.GEN_AI_CONVERSATION_COMPACTED) is None
        summaries = [c for c in rest if attr(c, a.GEN_AI_CONVERSATION_COMPACTED) is None]
        compacted = [c for c in rest if attr(c, a.GEN_AI_CONVERSATION_COMPACTED) is True]
        assert summaries, "CrewAI summarised with a model call of its own"
        assert all(attr(c, a.GEN_AI_RESPONSE_MODEL) == ANSWERED for c in rest)
        # every call made after the summary uses the compacted conversation
        summarised_at = max(c.end_time or 0 for c in summaries)
        assert all((c.start_time or 0) >= summarised_at for c in compacted)
        assert all((c.start_time or 0) < summarised_at for c in summaries)
        assert len(compacted) == (0 if placeholders else 1)
