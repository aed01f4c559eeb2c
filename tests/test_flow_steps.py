"""Flow steps: one ``crewai.flow.step {method}`` span per executed method of a user Flow.

A Flow with start -> router -> listen (the router's label picks the branch), a loop (a router
that listens to its own ``again`` label through ``or_`` until a counter reaches 2) and a crew
kicked off in one branch, run by 8 concurrent requests (threads and asyncio), each with its own
Flow instance; and a Flow whose step raises.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.trace import StatusCode

import crew_otel
from crew_otel import plan, targets
from crew_otel.hook_kinds import Layer, Status
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr

STEP = "crewai.flow.step"
NAME = "crewai.flow.method.name"
KIND = "crewai.flow.method.kind"
OUTCOME = "crewai.flow.router.outcome"
ROW = "crewai.flow.flow:Flow._execute_method"

#: (method, kind, router outcome) of every step a run executes, in order, by branch.
EXPECTED_STEPS = {
    "research": [
        ("begin", "start", None),
        ("choose", "router", "deep"),
        ("research", "listen", None),
        ("refine", "router", "again"),
        ("refine", "router", "finished"),
        ("done", "listen", None),
    ],
    "quick": [
        ("begin", "start", None),
        ("choose", "router", "fast"),
        ("quick", "listen", None),
        ("refine", "router", "again"),
        ("refine", "router", "finished"),
        ("done", "listen", None),
    ],
}


def flow_class(base_url: str) -> type:
    from crewai.flow.flow import Flow, listen, or_, router, start

    class BranchingFlow(Flow):  # type: ignore[misc,type-arg]
        @start()
        def begin(self) -> str:
            self.state["count"] = 0
            return str(self.state["topic"])

        @router(begin)
        def choose(self) -> str:
            return str(self.state["branch"])

        @listen("deep")
        def research(self) -> str:
            crew = research_crew(lambda: make_llm(base_url))
            self.state["answer"] = crew.kickoff(inputs={"topic": self.state["topic"]}).raw
            return str(self.state["answer"])

        @listen("fast")
        def quick(self) -> str:
            self.state["answer"] = f"quick note on {self.state['topic']}"
            return str(self.state["answer"])

        @router(or_(research, quick, "again"))
        def refine(self) -> str:
            self.state["count"] += 1
            return "again" if self.state["count"] < 2 else "finished"

        @listen("finished")
        def done(self) -> str:
            return f"{self.state['answer']} (refined {self.state['count']}x)"

    return BranchingFlow


def branch_of(i: int) -> str:
    return "deep" if i % 2 == 0 else "fast"


def inputs_of(i: int) -> dict[str, str]:
    return {"topic": f"[[fs{i}]]", "branch": branch_of(i)}


def run_requests(base_url: str) -> list[str]:
    """8 concurrent requests: 4 threads with ``kickoff``, 4 asyncio (``kickoff_async``,
    ``akickoff``), each with its own Flow instance."""
    cls = flow_class(base_url)

    def threaded(i: int) -> str:
        return str(cls().kickoff(inputs=inputs_of(i)))

    async def in_loop() -> list[Any]:
        calls = [
            (cls().kickoff_async if i % 2 else cls().akickoff)(inputs=inputs_of(i))
            for i in range(4, 8)
        ]
        return list(await asyncio.gather(*calls))

    with ThreadPoolExecutor(max_workers=5) as pool:
        threads = [pool.submit(threaded, i) for i in range(4)]
        async_results = pool.submit(asyncio.run, in_loop())
        results = [f.result() for f in threads] + [str(r) for r in async_results.result()]
    return results


def test_every_executed_flow_method_is_a_step_under_the_flow(otel, fake_provider):
    results = run_requests(fake_provider.base_url)
    for i, result in enumerate(results):
        assert f"[[fs{i}]]" in result
        assert result.endswith("(refined 2x)")

    spans = Spans(otel.get_finished_spans())
    assert spans.orphans() == []
    flows = [
        s
        for s in spans.named("invoke_workflow")
        if str(attr(s, "crewai.kickoff.entrypoint")).startswith("flow.")
    ]
    assert len(flows) == 8 == len(spans.traces())
    for flow in flows:
        assert spans.parent(flow) is None
        members = [s for s in spans.all if s.context.trace_id == flow.context.trace_id]
        assert {attr(s, REQUEST_ID) for s in members} == {attr(flow, REQUEST_ID)}
        steps = sorted(
            (s for s in members if s.name.startswith(STEP + " ")),
            key=lambda s: s.start_time or 0,
        )
        assert all(spans.parent(s) is flow for s in steps)
        executed = [(attr(s, NAME), attr(s, KIND), attr(s, OUTCOME)) for s in steps]
        branch = "research" if ("research", "listen", None) in executed else "quick"
        assert executed == EXPECTED_STEPS[branch]
        assert all(s.name == f"{STEP} {attr(s, NAME)}" for s in steps)
        assert all(s.status.status_code is not StatusCode.ERROR for s in steps)
        crews = [s for s in members if s.name == "invoke_workflow research"]
        if branch == "research":
            (crew,) = crews
            assert spans.parent(crew) is next(s for s in steps if attr(s, NAME) == "research")
            assert spans.named("crewai.agent.step")
        else:
            assert crews == []
    assert sorted(str(attr(f, "crewai.kickoff.entrypoint")) for f in flows) == sorted(
        ["flow.kickoff"] * 4 + ["flow.kickoff_async"] * 2 + ["flow.akickoff"] * 2
    )
    # CrewAI's internal flows (the agent executor's methods) get no step spans
    user_methods = {name for steps in EXPECTED_STEPS.values() for name, _, _ in steps}
    assert {attr(s, NAME) for s in spans.named(STEP)} == user_methods

    crew_otel.uninstrument()
    assert run_requests(fake_provider.base_url) == results


def test_a_failing_step_carries_the_error_and_the_caller_gets_it(otel):
    from crewai.flow.flow import Flow, listen, start

    raised: list[ValueError] = []

    class FailingFlow(Flow):  # type: ignore[misc,type-arg]
        @start()
        def prepare(self) -> str:
            return str(self.state["topic"])

        @listen(prepare)
        def validate(self) -> None:
            error = ValueError(f"invalid topic {self.state['topic']}")
            raised.append(error)
            raise error

    def run(i: int) -> BaseException | None:
        try:
            FailingFlow().kickoff(inputs={"topic": f"[[bad{i}]]"})
        except ValueError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        caught = list(pool.map(run, range(2)))
    assert len(raised) == 2
    assert all(any(exc is error for error in raised) for exc in caught)

    spans = Spans(otel.get_finished_spans())
    assert spans.orphans() == []
    failed = spans.named(f"{STEP} validate")
    assert len(failed) == 2
    for step in failed:
        assert step.status.status_code is StatusCode.ERROR
        assert attr(step, "error.type") == "ValueError"
        assert attr(step, "crew_otel.error.origin") is True
        assert attr(step, KIND) == "listen"
        assert any(e.name == "exception" for e in step.events)
        flow = spans.parent(step)
        assert flow is not None
        assert flow.name == "invoke_workflow FailingFlow"
        assert attr(flow, "error.type") == "ValueError"
        assert not attr(flow, "crew_otel.error.origin")
        (prepare,) = spans.kids(flow, f"{STEP} prepare")
        assert prepare.status.status_code is not StatusCode.ERROR
        assert attr(prepare, KIND) == "start"


def test_the_step_hook_is_a_row_of_the_plan_and_uninstrument_removes_it(otel):
    import crewai.flow.flow  # noqa: F401  - the row's module

    row = plan.build_plan().row(ROW)
    assert row is not None
    assert row.layer == Layer.FLOW
    (target,) = [t for t in targets.TARGETS if t.key == ROW]
    # crewai >= 1.12 runs every flow method through Flow._execute_method (a base class's in
    # newer versions); a CrewAI without it would skip the row, never fail.
    assert row.status == Status.INSTALLED, row.detail
    wrapped = targets.resolve(target).original
    assert hasattr(wrapped, "__wrapped__")
    crew_otel.uninstrument()
    original = targets.resolve(target).original
    assert original is wrapped.__wrapped__
    assert plan.build_plan().row(ROW).status == Status.INSTALLED  # resolvable again


def test_crewais_own_flows_run_without_a_coroutine_of_crew_otel_around_them(otel):
    """CrewAI's own Flows (the agent executor runs every step as one: about 30 method
    executions per kickoff of a 2-task crew) are never recorded: their calls reach CrewAI as if
    unwrapped, so no coroutine of crew_otel's sits around each, costing a frame at every
    resumption. A user's Flow, the same code otherwise, is recorded."""
    from crewai.flow.flow import Flow, start

    class InternalFlow(Flow):  # type: ignore[misc,type-arg]
        is_crewai_internal = True

        @start()
        def begin(self) -> str:
            return "internal"

    class UserFlow(Flow):  # type: ignore[misc,type-arg]
        @start()
        def begin(self) -> str:
            return "user"

    def crew_otels(coro: Any) -> bool:
        """Whether ``coro`` is a coroutine of crew_otel's (around CrewAI's)."""
        return "crew_otel" in coro.cr_code.co_filename

    def kicked_off(flow: Any) -> tuple[bool, Any]:
        coro = flow.kickoff_async()
        return crew_otels(coro), asyncio.run(coro)

    def step_wrapped(flow: Any) -> bool:
        coro = flow._execute_method("begin", flow.begin)
        try:
            return crew_otels(coro)
        finally:
            coro.close()

    wrapped, result = kicked_off(InternalFlow())
    assert result == "internal"
    assert not wrapped, "CrewAI's own coroutine, not crew_otel's"
    assert not step_wrapped(InternalFlow()), "no coroutine of crew_otel's around its steps"
    spans = Spans(otel.get_finished_spans())
    assert spans.named(STEP) == []
    assert not [s for s in spans.all if s.name.startswith("invoke_workflow")]

    wrapped, result = kicked_off(UserFlow())
    assert result == "user"
    assert wrapped, "a user's Flow is recorded: crew_otel's coroutine around CrewAI's"
    assert step_wrapped(UserFlow())
    spans = Spans(otel.get_finished_spans())
    assert [attr(s, NAME) for s in spans.named(STEP)] == ["begin"]
