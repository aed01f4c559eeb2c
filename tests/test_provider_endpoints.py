"""The loopback provider's embeddings endpoint and structured outputs, as CrewAI and the OpenAI
SDK use them, under concurrent requests (threads and asyncio)."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from pydantic import BaseModel

from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_agent, make_llm
from crew_otel.testing.provider import embedding_of
from tests.workloads import run_while_held

KEY = "sk-fake-key-for-the-loopback-provider"


class Verdict(BaseModel):
    summary: str
    score: int
    approved: bool
    tags: list[str]


def _client(provider: FakeOpenAIProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=provider.base_url, api_key=KEY, max_retries=0)


def test_embeddings_are_deterministic_unit_vectors_close_for_shared_words():
    with FakeOpenAIProvider() as provider:
        client = _client(provider)
        texts = [f"[[r{i}]] refund policy for order {i}" for i in range(16)]
        with ThreadPoolExecutor(8) as pool:
            vectors = list(
                pool.map(
                    lambda t: (
                        client.embeddings.create(model="text-embedding-3-small", input=t)
                        .data[0]
                        .embedding
                    ),
                    texts,
                )
            )
        # the SDK asks for base64 unless told otherwise; a float request decodes to the same
        floats = client.embeddings.create(
            model="text-embedding-3-small", input=texts[:3], encoding_format="float"
        )
        small = client.embeddings.create(model="m", input="a b", dimensions=8).data[0].embedding
        requests = provider.requests
    for text, vector in zip(texts, vectors, strict=True):
        assert len(vector) == 1536
        assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-4)
        assert vector == pytest.approx(embedding_of(text), abs=1e-6)
    for datum, text in zip(floats.data, texts[:3], strict=True):
        assert datum.embedding == pytest.approx(embedding_of(text), abs=1e-6)
    assert len(small) == 8

    def cosine(x: str, y: str) -> float:
        return sum(p * q for p, q in zip(embedding_of(x), embedding_of(y), strict=True))

    assert cosine("refund policy for orders", "the refund policy") > cosine(
        "refund policy for orders", "shipping times to Spain"
    )
    assert sorted(m for r in requests for m in r.markers) == sorted(
        [f"r{i}" for i in range(16)] + ["r0", "r1", "r2"]
    )
    assert {r.outcome for r in requests} == {"embeddings"}


def test_embeddings_faults_are_scripted_per_endpoint_and_marker():
    with FakeOpenAIProvider() as provider:
        client = _client(provider)
        provider.script(Fault.error(429), key="e1", endpoint="embeddings")
        provider.script(Fault.error(500), key="e1", endpoint="chat")

        async def main() -> list[object]:
            aclient = openai.AsyncOpenAI(base_url=provider.base_url, api_key=KEY, max_retries=0)
            calls = [aclient.embeddings.create(model="m", input=f"[[e{i}]] text") for i in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
        # the chat script is still queued: embeddings did not consume it
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "[[e1]]"}]
            )
        with pytest.raises(ValueError):
            provider.script(Fault.error(500), endpoint="responses")
    assert isinstance(results[1], openai.RateLimitError)
    assert [isinstance(r, BaseException) for r in results] == [False, True, False, False]


def test_held_requests_wait_at_their_gate_until_it_opens():
    """``Fault.hold``: each held request parks until the test opens the gate; unheld ones pass."""
    with FakeOpenAIProvider() as provider:
        client = _client(provider)
        for i in range(3):
            provider.script(Fault.hold("together"), key=f"h{i}")
        gate = provider.gate("together")

        def ask(marker: str) -> str:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"[[{marker}]]"}]
            )
            return str(answer.choices[0].message.content)

        with ThreadPoolExecutor(4) as pool:
            held = [pool.submit(ask, f"h{i}") for i in range(3)]
            gate.wait_parked(3)  # all three are inside the provider at once
            assert "[[free]]" in ask("free"), "a request with no hold is answered meanwhile"
            assert not any(f.done() for f in held)
            gate.open()
            assert [f"[[h{i}]]" in f.result(timeout=30) for i, f in enumerate(held)] == [True] * 3
        assert gate.parked == 3
        with pytest.raises(TimeoutError, match="3 of 4"):
            gate.wait_parked(4, timeout=0.01)


def test_reset_opens_and_forgets_the_gates():
    """A request parked at a gate is answered once the provider is reset, and the gate's name
    starts again from nothing."""
    with FakeOpenAIProvider() as provider:
        client = _client(provider)
        provider.script(Fault.hold("stale"), key="parked")
        gate = provider.gate("stale")
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(
                client.chat.completions.create,
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "[[parked]]"}],
            )
            gate.wait_parked(1)
            provider.reset()
            assert "[[parked]]" in str(held.result(timeout=30).choices[0].message.content)
        assert provider.gate("stale").parked == 0


def test_a_run_that_never_reaches_its_gate_fails_at_once():
    """``run_while_held`` with a holder that makes no model call: the wait for it to park
    fails as soon as the holder has returned, saying so, instead of waiting out its bound."""
    with FakeOpenAIProvider() as provider:
        others_ran: list[str] = []
        with pytest.raises(RuntimeError, match="ended before its model call reached the gate"):
            run_while_held(
                provider, "never", lambda: "no model call", [lambda: others_ran.append("x")]
            )
        assert others_ran == [], "the others never ran: the overlap could not be made a fact"


def test_structured_outputs_validate_under_concurrent_crewai_calls(fake_provider):
    def call(i: int) -> Verdict:
        llm = make_llm(fake_provider.base_url, response_format=Verdict)
        answer = llm.call(f"Judge [[s{i}]]")
        return Verdict.model_validate_json(answer) if isinstance(answer, str) else answer

    async def acall(i: int) -> object:
        llm = make_llm(fake_provider.base_url, response_format=Verdict)
        return await llm.acall(f"Judge [[a{i}]]")

    async def amain() -> list[object]:
        return await asyncio.gather(*(acall(i) for i in range(4)))

    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(call, range(4)))
    asynchronous = [
        Verdict.model_validate_json(r) if isinstance(r, str) else r for r in asyncio.run(amain())
    ]
    for i, verdict in enumerate(threaded):
        assert isinstance(verdict, Verdict)
        assert f"[[s{i}]]" in verdict.summary
        assert verdict.tags == [f"Answer for [[s{i}]]"]
        assert verdict.score == 1
        assert verdict.approved is True
    for i, verdict in enumerate(asynchronous):
        assert isinstance(verdict, Verdict)
        assert f"[[a{i}]]" in verdict.summary
    assert {r.outcome for r in fake_provider.requests} == {"structured"}


def test_task_output_pydantic_runs_offline_under_concurrent_kickoffs(fake_provider):
    from crewai import Crew, Task

    def run(i: int) -> Verdict | None:
        agent = make_agent(make_llm(fake_provider.base_url), "Reviewer")
        task = Task(
            description="Review {topic}",
            expected_output="A verdict",
            agent=agent,
            output_pydantic=Verdict,
        )
        output = Crew(agents=[agent], tasks=[task]).kickoff(inputs={"topic": f"[[p{i}]]"})
        return output.pydantic  # type: ignore[return-value]

    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(run, range(4)))
    for i, verdict in enumerate(verdicts):
        assert isinstance(verdict, Verdict), verdict
        assert f"[[p{i}]]" in verdict.summary


def test_memory_and_knowledge_run_offline_under_concurrent_kickoffs(fake_provider):
    """CrewAI's memory and knowledge embed, save, analyse and search through the provider."""
    from crewai import Crew, Task
    from crewai.knowledge.source.string_knowledge_source import StringKnowledgeSource
    from crewai.memory.unified_memory import Memory

    embedder = {
        "provider": "openai",
        "config": {"api_key": KEY, "api_base": fake_provider.base_url},
    }

    def run(i: int) -> str:
        agent = make_agent(make_llm(fake_provider.base_url), "Researcher")
        task = Task(description="Research {topic}", expected_output="facts", agent=agent)
        facts = StringKnowledgeSource(content=f"[[k{i}]] Refunds take 5 days.")
        crew = Crew(
            agents=[agent],
            tasks=[task],
            # the memory's own model calls go to the loopback provider too (CrewAI 1.12's
            # default memory model would call the hosted API)
            memory=Memory(llm=make_llm(fake_provider.base_url), embedder=embedder),
            embedder=embedder,
            knowledge_sources=[facts],
        )
        return crew.kickoff(inputs={"topic": f"[[m{i}]]"}).raw

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, range(4)))
    for i, answer in enumerate(answers):
        assert f"[[m{i}]]" in answer
        assert "Error executing tool" not in answer, answer  # the memory tool's arguments fit
    embedded = [r for r in fake_provider.requests if r.path == "/v1/embeddings"]
    assert {r.outcome for r in embedded} == {"embeddings"}
    markers = {m for r in embedded for m in r.markers}
    assert {f"k{i}" for i in range(4)} <= markers, markers  # every knowledge source embedded
