"""Every entry point, run concurrently: one trace and one request ID per kickoff.

Threads and asyncio, ``kickoff``/``kickoff_async``/``akickoff``/``kickoff_for_each*``,
``async_execution`` tasks, hierarchical delegation, streaming, user flows, threads the user
starts without copying the context.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry import trace

import crew_otel
from crew_otel.testing.crews import make_agent, make_llm, make_lookup_tool, research_crew
from tests.spans import REQUEST_ID, Spans, attr


def crew_for(fake_provider, **kwargs):
    return research_crew(lambda: make_llm(fake_provider.base_url), **kwargs)


def assert_span_model(spans: Spans, root) -> None:
    """kickoff > task > agent attempt > step > (chat > HTTP) and (tool), in one trace."""
    trace_id = root.context.trace_id
    request_id = attr(root, REQUEST_ID)
    assert request_id
    members = [s for s in spans.all if s.context.trace_id == trace_id]
    assert all(attr(s, REQUEST_ID) == request_id for s in members)
    assert all(isinstance(attr(s, "thread.id"), int) for s in members)
    parents_of = {
        "crewai.task": ("invoke_workflow",),
        "invoke_agent": ("crewai.task", "execute_tool", "invoke_agent"),
        "crewai.agent.step": ("invoke_agent", "invoke_workflow"),
        "chat": ("crewai.agent.step",),
        "execute_tool": ("crewai.agent.step",),
        "POST": ("chat",),
    }
    for span in members:
        op = span.name.split(" ", 1)[0]
        if op in parents_of:
            parent = spans.parent(span)
            assert parent is not None, f"{span.name} lost its parent"
            assert parent.name.split(" ", 1)[0] in parents_of[op], (span.name, parent.name)
    assert spans.named("chat"), "model calls traced"


def test_concurrent_threaded_kickoffs(otel, fake_provider):
    n = 12

    def run(i: int) -> str:
        return crew_for(fake_provider).kickoff(inputs={"topic": f"[[t{i}]]"}).raw

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(run, range(n)))
    for i, raw in enumerate(results):
        assert f"[[t{i}]]" in raw
    spans = Spans(otel.get_finished_spans())
    roots = spans.named("invoke_workflow")
    assert len(roots) == n
    assert len(spans.traces()) == n, "one trace per kickoff"
    assert len({attr(r, REQUEST_ID) for r in roots}) == n, "distinct request IDs"
    assert not spans.orphans()
    for root in roots:
        assert_span_model(spans, root)
    # kickoffs overlapped, and each saw how many were in flight when it started
    assert max(attr(r, "crew_otel.kickoffs.in_flight") for r in roots) > 1
    # 3 model calls per kickoff reached the provider, each traced with its kickoff's trace id
    assert fake_provider.stats()["requests"] == 3 * n
    traceparents = {r.traceparent.split("-")[1] for r in fake_provider.requests}
    assert traceparents == {f"{r.context.trace_id:032x}" for r in roots}


def test_caller_request_id_is_used_verbatim_across_threads(otel, fake_provider):
    def run(i: int) -> None:
        with crew_otel.request(f"client-{i}/X-Request-ID") as request_id:
            assert request_id == f"client-{i}/X-Request-ID"
            crew_for(fake_provider).kickoff(inputs={"topic": f"[[v{i}]]"})

    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(run, range(5)))
    spans = Spans(otel.get_finished_spans())
    for root in spans.named("invoke_workflow"):
        marker_trace = [s for s in spans.all if s.context.trace_id == root.context.trace_id]
        ids = {attr(s, REQUEST_ID) for s in marker_trace}
        assert len(ids) == 1
        assert ids.pop().startswith("client-")
    assert {attr(r, REQUEST_ID) for r in spans.named("invoke_workflow")} == {
        f"client-{i}/X-Request-ID" for i in range(5)
    }


def test_request_decorator_sync_and_async(otel, fake_provider):
    @crew_otel.request()
    def handler(i: int) -> str:
        return crew_for(fake_provider).kickoff(inputs={"topic": f"[[d{i}]]"}).raw

    @crew_otel.request("fixed-id")
    async def async_handler() -> str:
        result = await crew_for(fake_provider).akickoff(inputs={"topic": "[[ad]]"})
        return result.raw

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(handler, range(3)))
    assert "[[ad]]" in asyncio.run(async_handler())
    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    ids = [attr(r, REQUEST_ID) for r in roots]
    assert len(set(ids)) == 4
    assert "fixed-id" in ids


def test_concurrent_akickoff(otel, fake_provider):
    async def main() -> list[str]:
        crews = [crew_for(fake_provider) for _ in range(6)]
        results = await asyncio.gather(
            *(c.akickoff(inputs={"topic": f"[[a{i}]]"}) for i, c in enumerate(crews))
        )
        return [r.raw for r in results]

    results = asyncio.run(main())
    assert all(f"[[a{i}]]" in raw for i, raw in enumerate(results))
    spans = Spans(otel.get_finished_spans())
    roots = spans.named("invoke_workflow")
    assert len(roots) == 6 == len(spans.traces())
    assert len({attr(r, REQUEST_ID) for r in roots}) == 6
    assert not spans.orphans()
    for root in roots:
        assert attr(root, "crewai.kickoff.entrypoint") == "akickoff"
        assert attr(root, "crew_otel.kickoff.queue_wait") >= 0
        assert_span_model(spans, root)


def test_concurrent_kickoff_async(otel, fake_provider):
    async def main() -> None:
        crews = [crew_for(fake_provider) for _ in range(5)]
        await asyncio.gather(
            *(c.kickoff_async(inputs={"topic": f"[[k{i}]]"}) for i, c in enumerate(crews))
        )

    asyncio.run(main())
    spans = Spans(otel.get_finished_spans())
    roots = spans.named("invoke_workflow")
    # kickoff_async delegates to kickoff on the same object: one kickoff span, not two
    assert len(roots) == 5 == len(spans.traces())
    for root in roots:
        assert attr(root, "crewai.kickoff.entrypoint") == "kickoff_async"
        assert attr(root, "crew_otel.kickoff.queue_wait") >= 0
        # the work ran in the loop's default executor, not on the loop thread
        task_thread = attr(spans.kids(root, "crewai.task")[0], "thread.id")
        assert task_thread != attr(root, "thread.id")
        assert_span_model(spans, root)


@pytest.mark.parametrize(
    "entrypoint", ["kickoff_for_each", "kickoff_for_each_async", "akickoff_for_each"]
)
def test_kickoff_for_each_variants_keep_one_request_id(otel, fake_provider, entrypoint):
    inputs = [{"topic": f"[[e{i}]]"} for i in range(3)]

    def run_one(j: int) -> None:
        crew = crew_for(fake_provider)
        method = getattr(crew, entrypoint)
        results = (
            method(inputs) if entrypoint == "kickoff_for_each" else asyncio.run(method(inputs))
        )
        assert len(results) == 3
        assert sorted(m for r in results for m in ("[[e0]]", "[[e1]]", "[[e2]]") if m in r.raw) == [
            "[[e0]]",
            "[[e1]]",
            "[[e2]]",
        ]

    # two callers at once, each with its own for_each run
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run_one, range(2)))
    spans = Spans(otel.get_finished_spans())
    outer = [
        s
        for s in spans.named("invoke_workflow")
        if attr(s, "crewai.kickoff.entrypoint") == entrypoint
    ]
    assert len(outer) == 2
    assert len(spans.traces()) == 2
    for root in outer:
        inner = [k for k in spans.descendants(root) if k.name.startswith("invoke_workflow")]
        assert len(inner) == 3, "one child kickoff per input (the crew copies)"
        members = [s for s in spans.all if s.context.trace_id == root.context.trace_id]
        assert {attr(s, REQUEST_ID) for s in members} == {attr(root, REQUEST_ID)}
        assert not spans.orphans()
        for child in inner:
            assert len(spans.kids(child, "crewai.task")) == 2


def test_async_execution_task_stays_in_the_trace(otel, fake_provider):
    from crewai import Crew, Task

    def run(i: int) -> None:
        llm = make_llm(fake_provider.base_url)
        researcher = make_agent(llm, "Researcher", tools=[make_lookup_tool()])
        writer = make_agent(make_llm(fake_provider.base_url), "Writer")
        background = Task(
            name="background",
            description="Research {topic}",
            expected_output="facts",
            agent=researcher,
            async_execution=True,
        )
        write = Task(
            name="write",
            description="Write about {topic}",
            expected_output="text",
            agent=writer,
            context=[background],
        )
        Crew(agents=[researcher, writer], tasks=[background, write]).kickoff(
            inputs={"topic": f"[[as{i}]]"}
        )

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(run, range(3)))
    spans = Spans(otel.get_finished_spans())
    assert len(spans.traces()) == 3
    assert not spans.orphans()
    for root in spans.named("invoke_workflow"):
        async_task = spans.kids(root, "crewai.task background")[0]
        assert attr(async_task, "crewai.task.async_execution") is True
        assert attr(async_task, "thread.id") != attr(root, "thread.id"), "ran in its own thread"
        assert_span_model(spans, root)


def test_hierarchical_crew_nests_the_delegated_agent_under_the_manager_tool(otel, fake_provider):
    from crewai import Crew, Process, Task

    def run(i: int) -> None:
        researcher = make_agent(make_llm(fake_provider.base_url), "Researcher")
        writer = make_agent(make_llm(fake_provider.base_url), "Writer")
        task = Task(name="report", description="Report on {topic}", expected_output="report")
        Crew(
            agents=[researcher, writer],
            tasks=[task],
            process=Process.hierarchical,
            manager_llm=make_llm(fake_provider.base_url),
        ).kickoff(inputs={"topic": f"[[h{i}]]"})

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(run, range(3)))
    spans = Spans(otel.get_finished_spans())
    assert len(spans.traces()) == 3
    for root in spans.named("invoke_workflow"):
        (task,) = spans.kids(root, "crewai.task")
        (manager,) = spans.kids(task, "invoke_agent")
        assert manager.name == "invoke_agent Crew Manager"
        delegations = [t for t in spans.descendants(manager) if t.name.startswith("execute_tool")]
        assert delegations, "the manager delegated through a tool"
        coworker_attempts = spans.kids(delegations[0], "invoke_agent")
        assert [a.name for a in coworker_attempts] == ["invoke_agent Researcher"]
        assert_span_model(spans, root)


def test_streaming_kickoff_stays_in_the_kickoff_trace(otel, fake_provider):
    def run(i: int) -> str:
        crew = crew_for(fake_provider, stream=True)
        streaming = crew.kickoff(inputs={"topic": f"[[s{i}]]"})
        chunks = list(streaming)
        assert chunks
        return streaming.result.raw

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, range(3)))
    assert all(f"[[s{i}]]" in raw for i, raw in enumerate(results))
    spans = Spans(otel.get_finished_spans())
    roots = spans.named("invoke_workflow")
    assert len(roots) == 3 == len(spans.traces()), "the streaming worker joined the trace"
    assert not spans.orphans()
    for root in roots:
        assert_span_model(spans, root)
        assert len(spans.kids(root, "crewai.task")) == 2


def test_user_flow_with_a_crew_inside(otel, fake_provider):
    from crewai.flow.flow import Flow, start

    class ReportFlow(Flow):
        @start()
        def research(self):
            return crew_for(fake_provider).kickoff(inputs={"topic": self.state["topic"]}).raw

    def run(i: int) -> None:
        ReportFlow().kickoff(inputs={"topic": f"[[f{i}]]"})

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(run, range(3)))
    spans = Spans(otel.get_finished_spans())
    flows = [
        s
        for s in spans.named("invoke_workflow")
        if attr(s, "crewai.kickoff.entrypoint") == "flow.kickoff"
    ]
    assert len(flows) == 3 == len(spans.traces())
    for flow in flows:
        assert flow.name == "invoke_workflow ReportFlow"
        crews = [s for s in spans.descendants(flow) if s.name == "invoke_workflow research"]
        assert len(crews) == 1
        members = [s for s in spans.all if s.context.trace_id == flow.context.trace_id]
        assert {attr(s, REQUEST_ID) for s in members} == {attr(flow, REQUEST_ID)}
        assert_span_model(spans, crews[0])
    # CrewAI's internal flows (the agent executor) are not kickoffs
    assert all("AgentExecutor" not in s.name for s in spans.all)


def test_threads_started_without_copying_the_context_stay_in_the_run(otel, fake_provider):
    from crewai.tools import tool

    tracer = trace.get_tracer("my.app")

    def make_background_lookup():  # built per request
        @tool("background_lookup")
        def background_lookup(query: str) -> str:
            """Look up facts in a worker thread the tool starts itself."""
            out: list[str] = []

            def work() -> None:
                with tracer.start_as_current_span("my.worker"):
                    out.append(f"FACTS about {query}")

            worker = threading.Thread(target=work)  # no copy_context(): plain threading
            worker.start()
            worker.join()
            return out[0]

        return background_lookup

    def run(i: int) -> None:
        crew_for(fake_provider, tools=[make_background_lookup()]).kickoff(
            inputs={"topic": f"[[w{i}]]"}
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(run, range(4)))
    spans = Spans(otel.get_finished_spans())
    workers = spans.named("my.worker")
    assert len(workers) == 4
    for worker in workers:
        root = next(
            r
            for r in spans.named("invoke_workflow")
            if r.context.trace_id == worker.context.trace_id
        )
        assert attr(worker, REQUEST_ID) == attr(root, REQUEST_ID)
        assert spans.parent(worker).name == "execute_tool background_lookup"
    assert not [s for s in spans.all if attr(s, "crew_otel.shared_instance")]
