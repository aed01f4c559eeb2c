"""Per-hook cost: each crew_otel wrapper around a trivial target, next to a bare SDK span.

``python -m benchmarks.hooks -o FILE [pyperf options]`` runs the microbenchmarks under pyperf
(one worker process per benchmark and run, calibrated loops, warm-ups). ``--smoke`` times each
benchmark once in this process instead (for ``run.py --quick``: numbers, not statistics).

Each wrapper instance is built the way ``crew_otel.instrument()`` builds it (a
:class:`crew_otel.runtime.Runtime` on an SDK tracer and meter provider), put around a target
that returns at once with ``wrapt.FunctionWrapper`` (as the instrumentor does), and called on
real CrewAI objects (a Crew, Task, Agent, the native OpenAI LLM and a ``@tool``) inside the
context a real run would give it (a request ID; for a step, its agent attempt; for a tool,
its step). Values are process CPU seconds per call, measured around the loop *and* a flush of
the BatchSpanProcessor, so each value includes encoding the call's spans to OTLP protobuf.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common

#: Benchmarks in report order: name -> (what it is, rough seconds per call on a slow core,
#: used only to size the inner loop so that one value takes about 0.1 s).
FLOORS = {
    "bare call": ("plain method call, no wrapper (subtracted from every hook)", 2e-7),
    "wrapt pass-through": ("wrapt.FunctionWrapper whose wrapper only calls through", 1e-6),
    "SDK span": ("tracer.start_span(name).end(): the floor", 3e-5),
    "SDK span + attributes + context": (
        "start_span with 6 attributes, attach/detach it as current, end: a minimal wrapper",
        6e-5,
    ),
}
HOOKS = {
    "kickoff": ("KickoffWrapper(runtime, 'kickoff', 'crew') on Crew.kickoff", 1e-4),
    "task": ("TaskWrapper on Task._execute_core", 1e-4),
    "agent attempt": ("AgentAttemptWrapper on Agent.execute_task", 1e-4),
    "agent step": ("AgentStepWrapper on get_llm_response (ends the previous step)", 1e-4),
    "tool (native call)": (
        "NativeToolCallWrapper on AgentExecutor._execute_single_native_tool_call",
        1e-4,
    ),
    "tool (direct run)": ("ToolRunWrapper on Tool.run, called outside a dispatcher", 1e-4),
    "model call": ("ChatWrapper on OpenAICompletion.call", 1e-4),
}
NAMES = (*FLOORS, *HOOKS)
#: pyperf's outer loop count (fixed: no calibration process per benchmark).
LOOPS = 1000
#: Seconds one value should take.
VALUE_SECONDS = 0.1
#: Spans are exported in batches of this size, in the timing thread (see Fixtures).
EXPORT_BATCH = 512


def inner_loops(name: str) -> int:
    _, estimate = {**FLOORS, **HOOKS}[name]
    return max(1, round(VALUE_SECONDS / (LOOPS * estimate)))


_RESULT = "ok"
_MESSAGES = [
    {"role": "system", "content": "You are Researcher."},
    {"role": "user", "content": "Research observability using the lookup tool."},
]


def _target(*args: Any, **kwargs: Any) -> Any:
    return _RESULT


def _method(self: Any, *args: Any, **kwargs: Any) -> Any:
    return _RESULT


def _native_tool_target(self: Any, tool_call: Any) -> Any:
    return {"result": "FACTS about observability", "from_cache": False}


class _Plain:
    """A stand-in instance for the floors (which need no CrewAI object)."""

    bench_plain = _method


def _pipeline() -> common.Pipeline:
    """BatchSpanProcessor + OTLP encoding, its export driven from the timing thread.

    The processor's own thread never wakes during a loop (its batch threshold is above the
    batch the loop flushes), so each value contains exactly the export work of its own spans,
    in batches of EXPORT_BATCH as the processor's default would make, and no thread handover.
    """
    return common.Pipeline(
        set_global=False,
        max_queue_size=1_000_000,
        max_export_batch_size=4 * EXPORT_BATCH,
        schedule_delay_millis=3_600_000,
    )


class Fixtures:
    """The objects, wrappers and contexts of the benchmarks (built once per process)."""

    def __init__(self, names: tuple[str, ...] = NAMES) -> None:
        import wrapt
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        self.floor_pipeline = _pipeline()
        floor = self.floor_pipeline.tracer_provider.get_tracer("benchmark")
        plain = _Plain()
        type(plain).bench_passthrough = wrapt.FunctionWrapper(  # type: ignore[attr-defined]
            _method, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs)
        )
        inputs = dict(common.INPUTS)
        attributes = {
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.workflow.name": "research",
            "crewai.crew.id": "5b3f0c1e-0000-4000-8000-000000000000",
            "crewai.kickoff.entrypoint": "kickoff",
            "crew_otel.request.id": "benchmark-request",
            "thread.id": 1,
        }

        def minimal_span() -> None:
            span = floor.start_span("invoke_workflow research", attributes=attributes)
            token = otel_context.attach(trace.set_span_in_context(span))
            otel_context.detach(token)
            span.end()

        # name -> (pipeline or None when it makes no spans, context or None, one call)
        self.calls: dict[str, tuple[common.Pipeline | None, Any, Callable[[], Any]]] = {
            "bare call": (None, None, lambda: plain.bench_plain(inputs=inputs)),
            "wrapt pass-through": (
                None,
                None,
                lambda: plain.bench_passthrough(inputs=inputs),  # type: ignore[attr-defined]
            ),
            "SDK span": (
                self.floor_pipeline,
                None,
                lambda: floor.start_span("invoke_workflow research").end(),
            ),
            "SDK span + attributes + context": (self.floor_pipeline, None, minimal_span),
        }
        if any(name in HOOKS for name in names):
            self._build_hooks()

    def _build_hooks(self) -> None:
        from crew_otel.testing.crews import prepare_offline_environment

        prepare_offline_environment()
        import crewai  # noqa: F401
        import wrapt
        from openai.types.chat import ChatCompletionMessageFunctionToolCall
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        from crew_otel.config import CrewOtelConfig
        from crew_otel.context import ATTEMPT_KEY, REQUEST_ID_KEY
        from crew_otel.diagnosis.sharing import Kind
        from crew_otel.metrics import CrewOtelMetrics
        from crew_otel.processor import RequestSpanProcessor
        from crew_otel.runtime import Runtime
        from crew_otel.testing.crews import make_llm, research_crew
        from crew_otel.wrappers.agent import AgentAttemptWrapper, AgentScope, AgentStepWrapper
        from crew_otel.wrappers.base import Call
        from crew_otel.wrappers.kickoff import KickoffWrapper
        from crew_otel.wrappers.llm import ChatWrapper
        from crew_otel.wrappers.task import TaskWrapper
        from crew_otel.wrappers.tool import NativeToolCallWrapper, ToolRunWrapper

        self.pipeline = _pipeline()
        # What instrument() attaches to the application's provider.
        self.pipeline.tracer_provider.add_span_processor(RequestSpanProcessor())
        tracer = self.pipeline.tracer_provider.get_tracer("crew_otel")
        meter = self.pipeline.meter_provider.get_meter("crew_otel")
        runtime = Runtime.create(tracer, CrewOtelConfig.resolve({}), CrewOtelMetrics(meter))

        crew = research_crew(lambda: make_llm("http://127.0.0.1:9/v1"))
        task = crew.tasks[0]
        agent = task.agent
        tool = agent.tools[0]
        llm = agent.llm

        def wrap(function: Callable[..., Any], wrapper: Any) -> Any:
            return wrapt.FunctionWrapper(function, wrapper)

        # Wrapped the way the instrumentor wraps: a FunctionWrapper in the class dict.
        type(crew).bench_kickoff = wrap(_method, KickoffWrapper(runtime, "kickoff", Kind.CREW))
        type(task).bench_task = wrap(_method, TaskWrapper(runtime))
        type(agent).bench_attempt = wrap(_method, AgentAttemptWrapper(runtime))
        type(tool).bench_run = wrap(_method, ToolRunWrapper(runtime))
        type(llm).bench_chat = wrap(_method, ChatWrapper(runtime, rate_limit_layer=True))
        step = wrap(_target, AgentStepWrapper(runtime))  # a module-level function
        executor_cls = type(
            "AgentExecutor",
            (),
            {"bench_native": wrap(_native_tool_target, NativeToolCallWrapper(runtime))},
        )
        executor = executor_cls()
        executor._available_functions = {tool.name: tool.run}
        tool_call = ChatCompletionMessageFunctionToolCall(
            id="call_0",
            type="function",
            function={"name": tool.name, "arguments": '{"query": "observability"}'},
        )

        # The contexts a real run gives each hook.
        root = otel_context.Context()
        parent = tracer.start_span("invoke_workflow research")  # open for the whole process
        in_run = trace.set_span_in_context(
            parent, otel_context.set_value(REQUEST_ID_KEY, "benchmark-request", root)
        )
        attempt_span = tracer.start_span("invoke_agent Researcher", context=in_run)
        attempt_ctx = trace.set_span_in_context(attempt_span, in_run)
        step_scope = AgentScope(agent, id(task), 1, agent.role)
        step_scope.open(Call(attempt_span, attempt_ctx, step_scope))
        in_attempt = otel_context.set_value(ATTEMPT_KEY, step_scope, attempt_ctx)
        tool_scope = AgentScope(agent, id(task), 1, agent.role)
        tool_scope.open(Call(attempt_span, attempt_ctx, tool_scope))
        step_span = tracer.start_span("crewai.agent.step Researcher", context=attempt_ctx)
        tool_scope.step = Call(step_span, attempt_ctx, tool_scope)
        in_step = otel_context.set_value(ATTEMPT_KEY, tool_scope, attempt_ctx)

        inputs = dict(common.INPUTS)
        pipeline = self.pipeline
        self.calls.update(
            {
                "kickoff": (pipeline, root, lambda: crew.bench_kickoff(inputs=inputs)),
                "task": (pipeline, in_run, lambda: task.bench_task(agent, None, None)),
                "agent attempt": (pipeline, in_run, lambda: agent.bench_attempt(task)),
                "agent step": (
                    pipeline,
                    in_attempt,
                    lambda: step(messages=_MESSAGES, llm=llm, from_agent=agent, from_task=task),
                ),
                "tool (native call)": (
                    pipeline,
                    in_step,
                    lambda: executor.bench_native(tool_call),
                ),
                "tool (direct run)": (
                    pipeline,
                    in_run,
                    lambda: tool.bench_run(query="observability"),
                ),
                "model call": (
                    pipeline,
                    in_run,
                    lambda: llm.bench_chat(messages=_MESSAGES, tools=None, from_agent=agent),
                ),
            }
        )

    def timer(self, name: str) -> Callable[[int], float]:
        """A pyperf time function: process CPU seconds for ``loops`` x inner-loops calls.

        Spans are exported every EXPORT_BATCH calls and at the end, inside the timed region.
        """
        from opentelemetry import context as otel_context

        pipeline, ctx, call = self.calls[name]
        inner = inner_loops(name)
        flush = pipeline.flush if pipeline is not None else None

        def time_calls(loops: int) -> float:
            total = loops * inner
            token = otel_context.attach(ctx) if ctx is not None else None
            try:
                start = time.process_time()
                if flush is None:
                    for _ in range(total):
                        call()
                else:
                    done = 0
                    while done < total:
                        batch = min(EXPORT_BATCH, total - done)
                        for _ in range(batch):
                            call()
                        flush()
                        done += batch
                return time.process_time() - start
            finally:
                if token is not None:
                    otel_context.detach(token)

        return time_calls

    def spans_per_call(self, name: str, calls: int = 200) -> float:
        """Spans one call exports (a check that each hook does what it should)."""
        pipeline, ctx, call = self.calls[name]
        if pipeline is None:
            return 0.0
        from opentelemetry import context as otel_context

        pipeline.flush()
        before = pipeline.span_exporter.spans
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            for _ in range(calls):
                call()
        finally:
            if token is not None:
                otel_context.detach(token)
        pipeline.flush()
        return (pipeline.span_exporter.spans - before) / calls


def smoke(seconds: float = 0.03) -> dict[str, Any]:
    """Time each benchmark in this process, without pyperf (for ``run.py --quick``): the
    median of 3 timings of at least ``seconds`` each, after a warm-up."""
    fixtures = Fixtures()
    results = {}
    for name in NAMES:
        timer = fixtures.timer(name)
        timer(10)  # warm-up
        loops = 10
        while timer(loops) < seconds and loops < LOOPS:
            loops *= 4
        calls = loops * inner_loops(name)
        values = sorted(timer(loops) / calls for _ in range(3))
        results[name] = {
            "value": values[1],
            "calls": calls,
            "spans_per_call": fixtures.spans_per_call(name),
        }
    return results


#: Bytes copied before each cold call (:func:`cold`): more than the machine's caches hold, so
#: the call finds none of its code's or data's lines there.
EVICT_BYTES = 64 << 20
#: Cold calls per benchmark (and as many hot ones beside them).
COLD_CALLS = 200


def cold(calls: int = COLD_CALLS) -> dict[str, Any]:
    """Each benchmark's CPU per call with cold caches, beside the same call hot.

    In a run a hook runs between stretches of CrewAI's own work, which push its code and data
    out of the CPU's caches; the pyperf loops call it back to back, with everything cached.
    Here each call is timed alone (process CPU around the one call, the span flush outside the
    timing): *cold* right after 64 MB were copied (``EVICT_BYTES``), *hot* right after another
    call. Medians of ``calls`` each; the timing's own cost is the "bare call" row's.
    """
    from opentelemetry import context as otel_context

    fixtures = Fixtures()
    source, target = bytearray(EVICT_BYTES), bytearray(EVICT_BYTES)
    clock = time.process_time
    results: dict[str, Any] = {}
    for name in NAMES:
        pipeline, ctx, call = fixtures.calls[name]
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            for _ in range(20):  # warm-up: lazily built caches, the first calls' imports
                call()
            hot, cold_ = [], []
            for index in range(calls):
                target[:] = source  # streams the caches out
                start = clock()
                call()
                cold_.append(clock() - start)
                start = clock()
                call()
                hot.append(clock() - start)
                if pipeline is not None and index % 64 == 63:
                    pipeline.flush()
        finally:
            if token is not None:
                otel_context.detach(token)
        if pipeline is not None:
            pipeline.flush()
        results[name] = {"cold": statistics.median(cold_), "hot": statistics.median(hot)}
    return {"calls": calls, "evict_bytes": EVICT_BYTES, "benchmarks": results}


#: Suffix of the window that replays a hook's spans with the bare SDK (see ``floor_replay``).
FLOOR_SUFFIX = " / SDK floor"


def captured_spans(pipeline: common.Pipeline, ctx: Any, call: Callable[[], Any]) -> list[Any]:
    """The finished spans one ``call`` exports, in its steady state (after one call: an agent
    step ends the step before it); the exporter is intercepted for that call only."""
    from opentelemetry import context as otel_context

    exporter = pipeline.span_exporter
    seen: list[Any] = []
    success = exporter.export([])  # nothing to encode: the exporter's success value

    def keep(spans: Any) -> Any:
        seen.extend(spans)
        return success

    token = otel_context.attach(ctx) if ctx is not None else None
    try:
        call()
        pipeline.flush()
        exporter.export = keep  # an instance attribute over the method, removed below
        call()
        pipeline.flush()
    finally:
        if token is not None:
            otel_context.detach(token)
        exporter.__dict__.pop("export", None)
    return seen


def floor_replay(tracer: Any, spans: list[Any]) -> Callable[[], None]:
    """A call that makes the same spans with the bare SDK: same names, kinds, attributes (the
    request span processor's included), events and status, in the same parent context, and no
    crew_otel code. What the SDK itself costs for what a hook records: the irreducible part."""
    from opentelemetry.trace import Status

    plan = [
        (
            span.name,
            span.kind,
            dict(span.attributes or {}),
            [(event.name, dict(event.attributes or {})) for event in span.events],
            Status(span.status.status_code, span.status.description),
        )
        for span in spans
    ]

    def replay() -> None:
        for name, kind, attributes, events, status in plan:
            span = tracer.start_span(name, kind=kind, attributes=attributes)
            for event_name, event_attributes in events:
                span.add_event(event_name, event_attributes)
            if status.status_code.value:
                span.set_status(status)
            span.end()

    return replay


#: The window of one duration point recorded with the bare SDK (see ``histogram_point``).
HISTOGRAM_POINT = "SDK histogram point"


def histogram_point(pipeline: common.Pipeline) -> tuple[Any, Callable[[], None]]:
    """One point into an SDK histogram with a workflow name attribute, inside a sampled span's
    context (so the SDK's default exemplar filter takes an exemplar), as each of crew_otel's
    duration metrics records per call: the context and the call."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    histogram = pipeline.meter_provider.get_meter("benchmark").create_histogram("duration", "s")
    span = pipeline.tracer_provider.get_tracer("benchmark").start_span("parent")
    ctx = trace.set_span_in_context(span, otel_context.Context())
    attributes = {"gen_ai.workflow.name": "research"}
    return ctx, lambda: histogram.record(0.25, attributes)


def instruction_windows(calls: int) -> dict[str, Any]:
    """Each benchmark's ``calls`` calls (and the span flush after them) as a callgrind window
    of its own, dumped under the benchmark's name, after a warm-up of ``calls`` calls. Each
    hook is followed by its SDK floor (``name + FLOOR_SUFFIX``): its spans replayed with the
    bare SDK on a pipeline without crew_otel's span processor (:func:`floor_replay`).

    Run under ``valgrind --tool=callgrind --instr-atstart=no`` (:mod:`benchmarks.instructions`
    does); outside Valgrind it only makes the calls.
    """
    from opentelemetry import context as otel_context

    from benchmarks import callgrind

    fixtures = Fixtures()
    floor_tracer = fixtures.floor_pipeline.tracer_provider.get_tracer("benchmark")
    for name in HOOKS:
        pipeline, ctx, call = fixtures.calls[name]
        assert pipeline is not None
        hook_spans = captured_spans(pipeline, ctx, call)
        fixtures.calls[name + FLOOR_SUFFIX] = (
            fixtures.floor_pipeline,
            ctx,
            floor_replay(floor_tracer, hook_spans),
        )
    fixtures.calls[HISTOGRAM_POINT] = (None, *histogram_point(fixtures.floor_pipeline))
    spans = {}
    for name in (*NAMES, *(hook + FLOOR_SUFFIX for hook in HOOKS), HISTOGRAM_POINT):
        pipeline, ctx, call = fixtures.calls[name]
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            for _ in range(calls):  # warm-up: caches, first-call paths
                call()
            if pipeline is not None:
                pipeline.flush()
                before = pipeline.span_exporter.spans
            callgrind.start_instrumentation()
            callgrind.zero_stats()
            for _ in range(calls):
                call()
            if pipeline is not None:
                pipeline.flush()
            callgrind.dump_stats_at(name)
            callgrind.stop_instrumentation()
            if pipeline is not None:
                spans[name] = (pipeline.span_exporter.spans - before) / calls
        finally:
            if token is not None:
                otel_context.detach(token)
    return {"calls": calls, "spans_per_call": spans, "on_valgrind": callgrind.running_on_valgrind()}


def main() -> None:
    if "--callgrind" in sys.argv:
        calls = int(sys.argv[sys.argv.index("--callgrind") + 1])
        print(json.dumps(instruction_windows(calls)))
        return
    if "--cold" in sys.argv:
        out = sys.argv[sys.argv.index("--cold") + 1]
        calls = COLD_CALLS
        if "--calls" in sys.argv:
            calls = int(sys.argv[sys.argv.index("--calls") + 1])
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(cold(calls), handle, indent=1)
        return
    if "--smoke" in sys.argv:
        out = sys.argv[sys.argv.index("-o") + 1]
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"mode": "smoke", "benchmarks": smoke()}, handle, indent=1)
        return

    import pyperf

    runner = pyperf.Runner(loops=LOOPS, program_args=("-m", "benchmarks.hooks"))
    args = runner.parse_args()
    fixtures = None
    if args.worker:
        # Only this worker's benchmark is timed: build what it needs (CrewAI only for hooks).
        name = NAMES[args.worker_task]
        fixtures = Fixtures((name,))
        runner.metadata["spans_per_call"] = fixtures.spans_per_call(name)
    for name in NAMES:
        description = {**FLOORS, **HOOKS}[name][0]
        ours = fixtures is not None and name in fixtures.calls
        time_func = fixtures.timer(name) if ours else _never_called  # type: ignore[union-attr]
        runner.bench_time_func(
            name,
            time_func,
            inner_loops=inner_loops(name),
            metadata={"description": description},
        )


def _never_called(loops: int) -> float:
    raise RuntimeError("only pyperf workers time benchmarks")


if __name__ == "__main__":
    main()
