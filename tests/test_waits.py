"""Waits that stall a step: CrewAI's ``max_rpm`` limiter and ``human_input``.

* ``human_input=True``: the human's answer is typed into the terminal (``sys.stdin`` replaced
  by a terminal that records when each answer was read). Each prompt is a
  ``crewai.human_input`` span under the agent's attempt that covers the human's answer;
  a feedback round re-runs the agent after it. Threads (sync prompt) and ``akickoff`` on one
  event loop (async prompt), then again uninstrumented: the caller gets the same answers.
* ``max_rpm``: a call that did not wait leaves no span. The one slow test
  (:func:`test_a_shared_agents_rpm_limit_stalls_every_request_behind_one_sleep`, about 65 s,
  mostly sleeping) runs six requests at once on one shared Agent whose limiter lets three
  through: the fourth sleeps CrewAI's 60 s holding the limiter's lock, the other two wait for
  that lock. The same requests run uninstrumented in a child process at the same time.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import pytest

import crew_otel
from crew_otel import plan
from crew_otel.hook_kinds import Status
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import REQUEST_ID, Spans, attr, traces_by_marker, whole_run
from tests.workloads import outcome_summary

HUMAN = "crewai.human_input"
RPM_WAIT = "crewai.rpm.wait"
FEEDBACK = "Add a closing sentence."
N_THREADS = 4
N_ASYNC = 4


def seconds(span: Any) -> float:
    return (span.end_time - span.start_time) / 1e9


# --- human input --------------------------------------------------------------------------------
class HumanTerminal(io.TextIOBase):
    """The user's terminal: it records when each answer was read (``answers``: start and end,
    in the spans' clock).

    With ``feedback_first`` the human asks for a change the first time a thread reads, and
    accepts (an empty line) after that; otherwise the human accepts at once. No file descriptor,
    like a redirected stdin: CrewAI's async prompt then reads through ``input()`` too.
    """

    def __init__(self, feedback_first: bool) -> None:
        super().__init__()
        self.feedback_first = feedback_first
        self.local = threading.local()
        self.lock = threading.Lock()
        self.reads = 0
        self.answers: list[tuple[int, int]] = []

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        started = time.time_ns()
        first = not getattr(self.local, "answered", False)
        self.local.answered = True
        answer = f"{FEEDBACK}\n" if self.feedback_first and first else "\n"
        with self.lock:
            self.reads += 1
            self.answers.append((started, time.time_ns()))
        return answer


def reviewed_crew(fake_provider: Any, marker: str) -> Any:
    from crewai import Crew, Task

    agent = make_agent(make_llm(fake_provider.base_url), "Writer")
    task = Task(
        name="draft",
        description=f"Write one sentence about [[{marker}]].",
        expected_output="One sentence.",
        agent=agent,
        human_input=True,
    )
    return Crew(name="reviewed", agents=[agent], tasks=[task])


def kickoff_in_threads(make_crew: Callable[[str], Any], markers: Sequence[str]) -> dict[str, Any]:
    crews = {marker: make_crew(marker) for marker in markers}
    with ThreadPoolExecutor(max_workers=len(markers)) as pool:
        futures = {marker: pool.submit(crews[marker].kickoff) for marker in markers}
        return {marker: future.result() for marker, future in futures.items()}


def akickoff_on_one_loop(make_crew: Callable[[str], Any], markers: Sequence[str]) -> dict[str, Any]:
    crews = {marker: make_crew(marker) for marker in markers}

    async def main() -> list[Any]:
        return await asyncio.gather(*(crews[marker].akickoff() for marker in markers))

    return dict(zip(markers, asyncio.run(main()), strict=True))


def check_prompts(run: Spans, rounds: int, terminal: HumanTerminal) -> list[Any]:
    """The run's prompts: whole run, each under the agent's attempt, covering a human's answer,
    numbered, and summed on the attempt; no agent step is open while the human answers."""
    whole_run(run, "invoke_workflow reviewed")
    (agent,) = run.named("invoke_agent Writer")
    prompts = sorted(run.named(HUMAN), key=lambda s: s.start_time)
    assert [p.name for p in prompts] == [HUMAN] * rounds
    assert all(run.parent(p) is agent for p in prompts), "prompts nest under the attempt"
    assert [attr(p, "crewai.human_input.round") for p in prompts] == list(range(1, rounds + 1))
    for prompt in prompts:
        assert [
            (read, answered)
            for read, answered in terminal.answers
            if prompt.start_time <= read <= answered <= prompt.end_time
        ], "the prompt's span covers the human's answer"
    waited = attr(agent, "crewai.human_input.waited")
    assert waited == pytest.approx(sum(seconds(p) for p in prompts), abs=0.05)
    for step in run.named("crewai.agent.step"):
        for prompt in prompts:
            # the human's time is not inside a step: each step ends before or starts after
            assert step.end_time <= prompt.start_time or step.start_time >= prompt.end_time
    return prompts


def test_each_human_input_prompt_is_a_span_covering_the_humans_time(
    otel, fake_provider, monkeypatch
):
    """Threads: the human asks for a change once (the agent re-runs), then accepts."""
    markers = [f"h{i}" for i in range(N_THREADS)]
    terminal = HumanTerminal(feedback_first=True)
    monkeypatch.setattr("sys.stdin", terminal)

    def make_crew(marker: str) -> Any:
        return reviewed_crew(fake_provider, marker)

    outcomes = kickoff_in_threads(make_crew, markers)
    assert terminal.reads == 2 * N_THREADS
    for marker in markers:
        assert f"[[{marker}]]" in outcomes[marker].raw
    spans = Spans(otel.get_finished_spans())
    for marker, run in traces_by_marker(spans, fake_provider, markers).items():
        first, second = check_prompts(run, rounds=2, terminal=terminal)
        assert attr(first, "crewai.human_input.feedback") is True, marker
        assert attr(second, "crewai.human_input.feedback") is False, marker
        # the agent ran again between the feedback and the next prompt
        rerun = [
            s
            for s in run.named("crewai.agent.step")
            if first.end_time <= s.start_time and s.end_time <= second.start_time
        ]
        assert rerun, marker
        assert [s for s in run.named("chat") if s.start_time >= first.end_time], marker

    crew_otel.uninstrument()
    monkeypatch.setattr("sys.stdin", HumanTerminal(feedback_first=True))
    baseline = kickoff_in_threads(make_crew, markers)
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }


# CrewAI's async prompt first tries to read stdin as a pipe; the stdlib transport it gives up on
# fails in its own __del__ (a terminal without a file descriptor; with or without crew_otel).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_async_human_input_prompts_are_spans_too(otel, fake_provider, monkeypatch):
    """``akickoff`` on one loop: CrewAI's async prompt; the humans answer at the same time."""
    markers = [f"ha{i}" for i in range(N_ASYNC)]
    terminal = HumanTerminal(feedback_first=False)
    monkeypatch.setattr("sys.stdin", terminal)

    def make_crew(marker: str) -> Any:
        return reviewed_crew(fake_provider, marker)

    outcomes = akickoff_on_one_loop(make_crew, markers)
    assert terminal.reads == N_ASYNC
    for marker in markers:
        assert f"[[{marker}]]" in outcomes[marker].raw
    spans = Spans(otel.get_finished_spans())
    prompts = []
    for marker, run in traces_by_marker(spans, fake_provider, markers).items():
        (prompt,) = check_prompts(run, rounds=1, terminal=terminal)
        assert attr(prompt, "crewai.human_input.feedback") is False, marker
        prompts.append(prompt)
    assert len({attr(p, REQUEST_ID) for p in prompts}) == N_ASYNC

    crew_otel.uninstrument()
    monkeypatch.setattr("sys.stdin", HumanTerminal(feedback_first=False))
    baseline = akickoff_on_one_loop(make_crew, markers)
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }


# --- the max_rpm limiter -------------------------------------------------------------------------
RPM_ROWS = (
    "crewai.utilities.rpm_controller:RPMController.check_or_wait",
    "crewai.utilities.rpm_controller:RPMController._wait_for_next_minute",
)


def limited_crew(fake_provider: Any, marker: str, max_rpm: int) -> Any:
    from crewai import Crew, Task

    agent = make_agent(make_llm(fake_provider.base_url), "Writer")
    task = Task(
        name="draft",
        description=f"Write one sentence about [[{marker}]].",
        expected_output="One sentence.",
        agent=agent,
    )
    return Crew(name="limited", agents=[agent], tasks=[task], max_rpm=max_rpm)


def test_the_rpm_limiter_leaves_no_span_when_no_call_waits(otel, fake_provider):
    """Crews with a ``max_rpm`` they stay under: the limiter's hooks are installed and run, and
    add nothing to the trace."""
    import crewai.utilities.rpm_controller  # noqa: F401  - the rows' module

    built = plan.build_plan()
    for key in RPM_ROWS:
        row = built.row(key)
        assert row is not None, key
        assert row.status == Status.INSTALLED, row.detail
    markers = [f"r{i}" for i in range(N_THREADS + N_ASYNC)]

    def make_crew(marker: str) -> Any:
        return limited_crew(fake_provider, marker, max_rpm=100)

    def run_all() -> dict[str, Any]:
        outcomes = kickoff_in_threads(make_crew, markers[:N_THREADS])
        outcomes.update(akickoff_on_one_loop(make_crew, markers[N_THREADS:]))
        return outcomes

    outcomes = run_all()
    spans = Spans(otel.get_finished_spans())
    assert spans.named(RPM_WAIT) == []
    for run in traces_by_marker(spans, fake_provider, markers).values():
        root = whole_run(run, "invoke_workflow limited")
        (agent,) = run.named("invoke_agent Writer")
        assert attr(agent, "crewai.rpm.waited") is None
        assert root in run.ancestors(agent)

    crew_otel.uninstrument()
    baseline = run_all()
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }


SHARED_RPM = 3
#: One request more than twice the limit would make a second caller sleep; exactly twice the
#: limit: three pass, the fourth sleeps, the last two wait for its lock and then pass.
SHARED_MARKERS = [f"s{i}" for i in range(2 * SHARED_RPM)]
SHARED_THREADS = 4
#: CrewAI sleeps 60 s; a request that took longer than this waited for the limiter.
STALLED = 30.0


def shared_agent_requests(base_url: str) -> dict[str, tuple[tuple[str, str], float]]:
    """Six requests at once on one Agent with ``max_rpm``: four ``kickoff`` calls in threads,
    two ``kickoff_async`` on one event loop. Per marker: what the caller got, and how long the
    request took (seconds).

    One request first, alone, on an Agent of its own (no limit), as a service warms up: the
    first use of CrewAI's and the openai SDK's models in a process builds them, and requests
    racing on that first build can fail (pydantic's deferred build is not thread-safe), with
    or without instrumentation.
    """
    make_agent(make_llm(base_url), "Support Analyst").kickoff("Warm up [[warmup]].")
    agent = make_agent(make_llm(base_url), "Support Analyst", max_rpm=SHARED_RPM)
    results: dict[str, tuple[tuple[str, str], float]] = {}

    def outcome(marker: str, run: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            got: Any = run()
        except Exception as exc:
            got = exc
        results[marker] = (outcome_summary(got), time.perf_counter() - start)

    def in_thread(marker: str) -> None:
        outcome(marker, lambda: agent.kickoff(f"Answer the customer about [[{marker}]]."))

    async def on_loop() -> None:
        async def one(marker: str) -> None:
            start = time.perf_counter()
            try:
                got: Any = await agent.kickoff_async(f"Answer the customer about [[{marker}]].")
            except Exception as exc:
                got = exc
            results[marker] = (outcome_summary(got), time.perf_counter() - start)

        await asyncio.gather(*(one(marker) for marker in SHARED_MARKERS[SHARED_THREADS:]))

    with ThreadPoolExecutor(max_workers=SHARED_THREADS + 1) as pool:
        futures = [pool.submit(in_thread, marker) for marker in SHARED_MARKERS[:SHARED_THREADS]]
        futures.append(pool.submit(asyncio.run, on_loop()))
        for future in futures:
            future.result()
    return results


def _uninstrumented_shared_agent_requests(conn: Connection) -> None:
    """In a spawned child process: the same requests, never instrumented, own provider."""
    import tests.conftest  # noqa: F401  - offline, loopback-only network, crewai imported
    from crew_otel.testing import FakeOpenAIProvider

    with FakeOpenAIProvider() as provider:
        conn.send(shared_agent_requests(provider.base_url))
    conn.close()


def stalled(results: dict[str, tuple[tuple[str, str], float]]) -> list[bool]:
    return sorted(elapsed >= STALLED for _, elapsed in results.values())


@pytest.mark.slow
def test_a_shared_agents_rpm_limit_stalls_every_request_behind_one_sleep(otel, fake_provider):
    """The long test (about 65 s: CrewAI's 60 s sleep, once, in two processes at once)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_uninstrumented_shared_agent_requests, args=(send,))
    child.start()
    send.close()
    try:
        results = shared_agent_requests(fake_provider.base_url)
        assert receive.poll(120), "the uninstrumented run did not finish"
        baseline = receive.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()

    # the caller's view: same answers, and the same requests stalled, as without instrumentation
    assert {m: r[0] for m, r in results.items()} == {m: r[0] for m, r in baseline.items()}
    assert all(r[0][0] == "ok" and f"[[{m}]]" in r[0][1] for m, r in results.items())
    assert stalled(results) == stalled(baseline) == [False] * SHARED_RPM + [True] * SHARED_RPM

    spans = Spans(otel.get_finished_spans())
    runs = traces_by_marker(spans, fake_provider, SHARED_MARKERS)
    waits: dict[str, Any] = {}
    for marker, run in runs.items():
        root = whole_run(run, "invoke_workflow Support Analyst")
        found = run.named(RPM_WAIT)
        assert len(found) <= 1, marker
        stalled_request = results[marker][1] >= STALLED
        assert bool(found) is stalled_request, (marker, results[marker])
        if found:
            (wait,) = found
            assert run.parent(wait) is root
            assert attr(wait, "crewai.rpm.limit") == SHARED_RPM
            assert attr(root, "crewai.rpm.waited") == pytest.approx(seconds(wait), abs=0.05)
            # the wait comes before the model call it held back
            (chat,) = run.named("chat")
            assert wait.end_time <= chat.start_time
            waits[marker] = wait

    by_reason: dict[str, list[Any]] = {"limit": [], "lock": []}
    for wait in waits.values():
        by_reason[attr(wait, "crewai.rpm.wait.reason")].append(wait)
    (sleeper,) = by_reason["limit"]
    waiters = by_reason["lock"]
    assert len(waiters) == SHARED_RPM - 1
    assert seconds(sleeper) >= 59.0
    sleeper_request = attr(sleeper, REQUEST_ID)
    for waiter in waiters:
        # it waited for the lock the sleeping request held, from another thread, until that
        # sleep was over
        assert attr(waiter, "crew_otel.rpm.lock_holder.request_id") == sleeper_request
        assert attr(waiter, REQUEST_ID) != sleeper_request
        assert attr(waiter, "thread.id") != attr(sleeper, "thread.id")
        assert waiter.start_time <= sleeper.end_time <= waiter.end_time
        assert attr(waiter, "crewai.rpm.lock_wait") == pytest.approx(seconds(waiter), abs=0.05)
        assert seconds(waiter) >= STALLED
