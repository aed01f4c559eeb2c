"""The shared-state corpus through CrewAI: recall and false alarms, measured.

Every shape of ``tests/shared_state_corpus/shapes.py`` runs as 6 concurrent requests (threads;
``akickoff`` for a subset), every CrewAI object built per request. A shared shape must be named
(right kind, the name a person recognises, the other request IDs) on every request but the
first to touch it; a correct shape must report nothing. The figures are printed and asserted:
recall >= 95 %, no false alarm. Overlap is a fact: the tool calls meet at a barrier, and each
run's answer after its tool call is held by the loopback provider until all 6 arrive, so every
tool call has ended (its writes confirmed) while every run is still in flight.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import ConfigDict

import crew_otel
from crew_otel.testing import Fault
from crew_otel.testing.crews import make_agent, make_llm
from crew_otel.testing.provider import FakeOpenAIProvider
from tests.shared_state_corpus import shapes, support
from tests.shared_state_corpus.shapes import SHAPES, Shape
from tests.spans import REQUEST_ID, Spans, attr

N = 6
EVENT = "crew_otel.shared_instance"
#: shape id -> True (named right) / False (missed or a false alarm), for the figures.
OUTCOMES: dict[str, bool] = {}


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeOpenAIProvider]:
    with FakeOpenAIProvider() as fake:
        yield fake


@pytest.fixture
def place(tmp_path, provider) -> Iterator[str]:
    support.PLACE["dir"] = str(tmp_path)
    for name in ("tickets.sqlite", "shared.sqlite"):
        with sqlite3.connect(tmp_path / name) as connection:
            connection.execute("CREATE TABLE tickets (q TEXT)")
    shapes.open_module_resources()
    import httpx

    shapes.CLIENT.update(client=httpx.Client(timeout=10), url=provider.base_url)
    os.environ.pop("CREW_OTEL_CORPUS_TICKET", None)
    yield str(tmp_path)
    shapes.CLIENT.pop("client").close()
    shapes.close_module_resources()
    shapes.SHARED_CONNECTION.pop("c").close()
    os.environ.pop("CREW_OTEL_CORPUS_TICKET", None)
    support.GATE.clear()


def build_tool(shape: Shape, i: int) -> Any:
    """Request ``i``'s tool, built for the request."""
    made = shape.make(i)
    if shape.tool_class is None:
        from crewai.tools import tool

        if not made.__doc__:  # CrewAI's @tool needs a description
            made.__doc__ = "Handle the ticket."
        return tool(made.__name__)(made)
    from crewai.tools import BaseTool

    logic = shape.tool_class
    namespace = {
        "__module__": logic.__module__,
        "__annotations__": {"name": str, "description": str, "connection": Any, "seen": Any},
        "name": "corpus_tool",
        "description": "Handle the ticket.",
        "model_config": ConfigDict(arbitrary_types_allowed=True),
        "connection": None,
        "seen": None,
    }
    cls = type(f"{logic.__name__}Tool", (logic, BaseTool), namespace)
    return cls(**made)


def crew_for(shape: Shape, i: int, provider: FakeOpenAIProvider) -> Any:
    from crewai import Crew, Task

    agent = make_agent(make_llm(provider.base_url), "Support Analyst", [build_tool(shape, i)])
    task = Task(
        description="Handle ticket {topic} with the tool.",
        expected_output="The ticket's resolution.",
        agent=agent,
    )
    return Crew(agents=[agent], tasks=[task], verbose=False)


def run_threads(shape: Shape, provider: FakeOpenAIProvider, gate_name: str) -> None:
    support.GATE["barrier"] = threading.Barrier(N)
    for i in range(N):  # the answer after the tool call waits for every run's
        provider.script(None, Fault.hold(gate_name), key=f"t{i}")

    def run(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            crew = crew_for(shape, i, provider)
            return str(crew.kickoff(inputs={"topic": f"[[t{i}]]"}).raw)

    with ThreadPoolExecutor(max_workers=N) as pool:
        futures = [pool.submit(run, i) for i in range(N)]
        gate = provider.gate(gate_name)
        gate.wait_parked(N, timeout=60)
        gate.open()
        for future in futures:
            future.result(timeout=120)


def run_async(shape: Shape, provider: FakeOpenAIProvider) -> None:
    support.GATE["barrier"] = threading.Barrier(N)

    async def one(i: int) -> str:
        with crew_otel.request(f"req-{i}"):
            crew = crew_for(shape, i, provider)
            return str((await crew.akickoff(inputs={"topic": f"[[t{i}]]"})).raw)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(N)))

    asyncio.run(main())


def verdict(shape: Shape, spans: Spans) -> tuple[bool, str]:
    """(named right / silent as it should be, why not)."""
    found = [
        (span, dict(event.attributes or {}))
        for span in spans.all
        for event in span.events
        if event.name == EVENT
    ]
    if shape.kind is None:
        return not found, f"false alarm: {[e for _, e in found]}"
    request_ids = {f"req-{i}" for i in range(N)}
    flagged = set()
    for span, event in found:
        others = set(event["crew_otel.shared_instance.other_request_ids"])
        if (
            event["crew_otel.shared_instance.kind"] != shape.kind
            or event["crew_otel.shared_instance.name"] != shape.expected_name()
            or not others
            or not others <= request_ids
            or attr(span, REQUEST_ID) in others
        ):
            return False, f"wrong report: {event}"
        flagged.add(attr(span, REQUEST_ID))
    return len(flagged) >= N - 1, f"{len(flagged)} of {N - 1} requests named it"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


CASES = [pytest.param(shape, "threads", id=f"{slug(shape.id)}-threads") for shape in SHAPES] + [
    pytest.param(shape, "akickoff", id=f"{slug(shape.id)}-akickoff")
    for shape in SHAPES
    if shape.asyncio
]


@pytest.mark.parametrize(("shape", "runner"), CASES)
def test_shape(otel, provider, place, shape: Shape, runner: str) -> None:
    if runner == "threads":
        run_threads(shape, provider, gate_name=f"{slug(shape.id)}-{runner}")
    else:
        run_async(shape, provider)
    spans = Spans(otel.get_finished_spans())
    assert len(spans.named("execute_tool")) >= N
    ok, why = verdict(shape, spans)
    OUTCOMES[f"{slug(shape.id)}-{runner}"] = ok
    assert ok, f"{shape.id} ({runner}): {why}"


def test_recall_and_false_alarms_figures() -> None:
    """Run last (file order): the figures over every case that ran."""
    if len(OUTCOMES) < len(CASES):
        pytest.skip("only part of the corpus ran")
    shared = [case.id for case in CASES if case.values[0].kind is not None]
    correct = [case.id for case in CASES if case.values[0].kind is None]
    named = sum(OUTCOMES[c] for c in shared)
    alarms = sum(not OUTCOMES[c] for c in correct)
    recall = named / len(shared)
    print(
        f"\nshared-state corpus: {len(shared)} shared cases, {named} named "
        f"(recall {recall:.0%}); {len(correct)} correct cases, {alarms} false alarms"
    )
    assert recall >= 0.95
    assert alarms == 0
