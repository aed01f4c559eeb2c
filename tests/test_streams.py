"""Streaming kickoffs and the kickoff span's lifetime.

A streaming kickoff returns at once; its run happens while (or after) the caller iterates. The
kickoff span must stay one trace with one request ID, last exactly as long as the run, and count
in ``crew_otel.kickoffs.active`` exactly while the run is in flight: for sync and async streams,
consumed fully, partly, closed or abandoned, and for callers that stop waiting (a timeout) while
the kickoff's worker thread goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan

import crew_otel
from crew_otel import attributes as a
from crew_otel import metrics as m
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_llm, research_crew
from crew_otel.testing.provider import MARKER, Gate
from tests.spans import REQUEST_ID, Spans, attr
from tests.support.waiting import wait_for

T = TypeVar("T")

N = 4
#: A bound against a broken test (a run that never gets there), not a measurement.
WAIT_S = 60.0


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """Spans must end with the run, not when a cyclic garbage collection happens to run."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def stream_crew(provider: FakeOpenAIProvider) -> Any:
    return research_crew(lambda: make_llm(provider.base_url), stream=True)


def active(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    value = 0.0
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == m.KICKOFFS_ACTIVE:
                    value += sum(p.value for p in metric.data.data_points)
    return value


def hold_each(provider: FakeOpenAIProvider, gate: Gate, markers: list[str], nth: int = 1) -> None:
    """Park the ``nth`` model request of each marker's run at ``gate``."""
    for marker in markers:
        provider.script(*[None] * (nth - 1), Fault.hold(gate.name), key=marker)


@contextlib.contextmanager
def when_parked(gate: Gate, count: int, look: Callable[[], T]) -> Iterator[list[T]]:
    """While the body runs the runs: once ``count`` requests are parked at ``gate`` (their runs
    in flight together), note ``look()`` in the list yielded, then open the gate."""
    seen: list[T] = []
    failed: list[BaseException] = []

    def watch() -> None:
        try:
            gate.wait_parked(count, WAIT_S)
            seen.append(look())
        except BaseException as exc:
            failed.append(exc)
        finally:
            gate.open()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
        watcher.join()
    finally:
        gate.open()
    if failed:
        raise failed[0]


def wait_until(predicate: Callable[[], bool]) -> bool:
    """Poll (bounded) until ``predicate()``: a run's end, in a thread CrewAI owns."""
    return bool(wait_for(predicate, WAIT_S, "the runs' work to end", 0.01))


def kickoffs(spans: Spans) -> list[ReadableSpan]:
    return spans.named("invoke_workflow")


def assert_one_trace_per_kickoff(
    spans: Spans, provider: FakeOpenAIProvider, markers: list[str]
) -> dict[str, ReadableSpan]:
    """One trace and one request ID per kickoff, every span ended, parents cover children.

    Returns the root kickoff span of each marker's run (matched by the ``traceparent`` its
    model requests carried).
    """
    roots = spans.roots()
    assert all(r.name.startswith("invoke_workflow") for r in roots), [r.name for r in roots]
    assert len(roots) == len(markers) == len(spans.traces()), "one trace per kickoff"
    assert not spans.orphans(), "every span's parent ended and was exported"
    by_trace = {format(r.context.trace_id, "032x"): r for r in roots}
    by_marker: dict[str, ReadableSpan] = {}
    for marker in markers:
        sent = [r for r in provider.requests if marker.strip("[]") in r.markers]
        assert sent, marker
        traces = {r.traceparent.split("-")[1] for r in sent if r.traceparent}
        assert all(r.traceparent for r in sent), "every model request carried the trace"
        assert len(traces) == 1, traces
        root = by_trace[traces.pop()]
        by_marker[marker] = root
        members = spans.traces()[root.context.trace_id]
        request_ids = {attr(s, REQUEST_ID) for s in members}
        assert len(request_ids) == 1, request_ids
        assert None not in request_ids
        for span in members:
            parent = spans.parent(span)
            if parent is not None:
                assert parent.start_time <= span.start_time, (parent.name, span.name)
                assert span.end_time <= parent.end_time, f"{span.name} ended after {parent.name}"
        chats = [s for s in members if s.name.startswith("chat")]
        assert len(chats) == len(sent), "an ended chat span for every model request of the run"
    assert len(set(map(id, by_marker.values()))) == len(markers)
    return by_marker


def streams_isolated() -> bool:
    """Whether CrewAI gives each concurrent stream only its own run's chunks (not in 1.12)."""
    from crewai.utilities import streaming

    return hasattr(streaming, "_current_stream_ids")


STREAMS_ISOLATED = streams_isolated()


def assert_same_chunks(baseline: list[str], traced: list[str]) -> None:
    """Each stream yields what it yields without instrumentation.

    CrewAI 1.12 hands every concurrent stream the chunks of every run, with or without
    instrumentation; timing decides which stream gets which chunk, and chunks of two runs may
    interleave inside one answer (even inside a marker). There, each stream yields text, and
    only the runs' own (every ``[[...]]`` in it comes from their ``[[as...]]`` markers); each
    run's result is compared separately.
    """
    if STREAMS_ISOLATED:
        assert traced == baseline
        return
    for text in (*baseline, *traced):
        assert text
        assert all(marker.startswith("as") for marker in MARKER.findall(text)), text


def last_chat_end(spans: Spans, root: ReadableSpan) -> int:
    return max(s.end_time for s in spans.descendants(root) if s.name.startswith("chat"))


async def consume_async(crew: Any, entrypoint: str, topic: str) -> tuple[str, str]:
    streaming = await getattr(crew, entrypoint)(inputs={"topic": topic})
    text = "".join([chunk.content async for chunk in streaming])
    return text, streaming.result.raw


def run_async_streams(provider: FakeOpenAIProvider, entrypoint: str, tag: str) -> list[Any]:
    async def main() -> list[Any]:
        crews = [stream_crew(provider) for _ in range(N)]
        return await asyncio.gather(
            *(consume_async(c, entrypoint, f"[[{tag}{i}]]") for i, c in enumerate(crews))
        )

    return asyncio.run(main())


@pytest.mark.parametrize("entrypoint", ["kickoff_async", "akickoff"])
def test_concurrent_async_streams_are_one_trace_each(
    otel, metric_reader, fake_provider, entrypoint
):
    gate = fake_provider.gate("streams")
    hold_each(fake_provider, gate, [f"as{i}" for i in range(N)])

    def look() -> tuple[float, int]:
        return active(metric_reader), len(kickoffs(Spans(otel.get_finished_spans())))

    with when_parked(gate, N, look) as seen:
        outputs = run_async_streams(fake_provider, entrypoint, "as")
    # every run inside its first model call: all in flight, no kickoff span ended yet
    assert seen == [(N, 0)]
    assert active(metric_reader) == 0

    spans = Spans(otel.get_finished_spans())
    markers = [f"[[as{i}]]" for i in range(N)]
    roots = assert_one_trace_per_kickoff(spans, fake_provider, markers)
    for _marker, root in roots.items():
        assert attr(root, "crewai.kickoff.entrypoint") == entrypoint
        assert len(spans.kids(root, "crewai.task")) == 2, "the run is under the kickoff span"
        assert root.end_time >= last_chat_end(spans, root), "lasts as long as the run"
    for i, (text, raw) in enumerate(outputs):
        assert f"[[as{i}]]" in raw
        assert text

    crew_otel.uninstrument()
    fake_provider.reset()
    baseline = run_async_streams(fake_provider, entrypoint, "as")
    assert [raw for _, raw in baseline] == [raw for _, raw in outputs]
    assert_same_chunks([t for t, _ in baseline], [t for t, _ in outputs])


@pytest.mark.parametrize("entrypoint", ["kickoff_for_each_async", "akickoff_for_each"])
def test_for_each_async_stream_is_one_trace(otel, metric_reader, fake_provider, entrypoint):
    topics = [f"[[fe{i}]]" for i in range(2)]
    gate = fake_provider.gate("copies")
    hold_each(fake_provider, gate, ["fe0", "fe1"])

    async def main() -> tuple[str, list[str]]:
        streaming = await getattr(stream_crew(fake_provider), entrypoint)(
            [{"topic": t} for t in topics]
        )
        text = "".join([chunk.content async for chunk in streaming])
        return text, [r.raw for r in streaming.results]

    with when_parked(gate, 2, lambda: active(metric_reader)) as seen:
        text, raws = asyncio.run(main())
    assert seen == [1], "both copies in flight, one kickoff: the copies nest in it"
    assert active(metric_reader) == 0

    spans = Spans(otel.get_finished_spans())
    assert len(spans.traces()) == 1, "one trace, not one per copy and per stream"
    (root,) = spans.roots()
    assert attr(root, "crewai.kickoff.entrypoint") == entrypoint
    assert len({attr(s, REQUEST_ID) for s in spans.all}) == 1
    nested = spans.kids(root, "invoke_workflow")
    assert len(nested) == 2
    assert not spans.orphans()
    for child in nested:
        assert len(spans.kids(child, "crewai.task")) == 2
        assert root.start_time <= child.start_time
        assert child.end_time <= root.end_time
    assert root.end_time >= last_chat_end(spans, root)
    assert all(t in raw for t, raw in zip(topics, raws, strict=True))
    assert text

    crew_otel.uninstrument()
    baseline_text, baseline_raws = asyncio.run(main())
    assert baseline_raws == raws
    if STREAMS_ISOLATED:
        assert sorted(baseline_text) == sorted(text), "same chunks (interleaving may differ)"


def test_abandoned_sync_streams_end_with_their_runs(
    otel, metric_reader, fake_provider, no_cyclic_gc
):
    """Streams taken from threads, iterated partly or not at all, then dropped."""
    barrier = threading.Barrier(N + 1)
    first_chunks: list[str] = []
    # the runs of the iterated streams go on until the test lets their last model call answer
    gate = fake_provider.gate("abandoned")
    hold_each(fake_provider, gate, ["ab0", "ab2"], nth=3)

    def run(i: int) -> None:
        streaming = stream_crew(fake_provider).kickoff(inputs={"topic": f"[[ab{i}]]"})
        if i % 2 == 0:
            first_chunks.append(next(iter(streaming)).content)
        del streaming  # abandoned: no close, no further iteration
        barrier.wait()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N)]
    try:
        for thread in threads:
            thread.start()
        barrier.wait()
        for thread in threads:
            thread.join()
        started = N // 2  # streams that were iterated: only those ran
        assert active(metric_reader) == N, "the two started runs and the two untouched streams"
    finally:
        gate.open()
    assert wait_until(lambda: active(metric_reader) == N - started), (
        "kickoffs whose run finished are no longer in flight (without a garbage collection)"
    )
    spans = Spans(otel.get_finished_spans())
    assert len(kickoffs(spans)) == started
    roots = assert_one_trace_per_kickoff(spans, fake_provider, ["[[ab0]]", "[[ab2]]"])
    for root in roots.values():
        assert root.end_time >= last_chat_end(spans, root)
        assert len(spans.kids(root, "crewai.task")) == 2, "the whole run, under its kickoff"
    # Streams never iterated never ran: they end when the object is collected.
    assert not [r for r in fake_provider.requests if {"ab1", "ab3"} & set(r.markers)]
    gc.collect()
    assert active(metric_reader) == 0
    assert len(kickoffs(Spans(otel.get_finished_spans()))) == N


@pytest.mark.parametrize("how", ["aclose", "abandon"])
@pytest.mark.parametrize("entrypoint", ["kickoff_async", "akickoff"])
def test_async_streams_closed_or_abandoned_end_every_span(
    otel, metric_reader, fake_provider, no_cyclic_gc, entrypoint, how
):
    gate = fake_provider.gate("one-chunk")
    hold_each(fake_provider, gate, [f"ac{i}" for i in range(N)])

    async def take_one_chunk(i: int) -> None:
        crew = stream_crew(fake_provider)
        streaming = await getattr(crew, entrypoint)(inputs={"topic": f"[[ac{i}]]"})
        chunks = streaming.__aiter__()
        await chunks.__anext__()
        if how == "aclose":
            # crewai >= 1.13 cancels the run through the output; 1.12 has only the generator
            closer = getattr(streaming, "aclose", None) or chunks.aclose
            await closer()

    async def main() -> None:
        await asyncio.gather(*(take_one_chunk(i) for i in range(N)))
        loop = asyncio.get_running_loop()
        done = await loop.run_in_executor(None, wait_until, lambda: active(metric_reader) == 0)
        assert done, "kickoffs.active back to 0 once the runs' work is over"

    with when_parked(gate, N, lambda: active(metric_reader)) as seen:
        asyncio.run(main())
    assert seen == [N], "every run inside its first model call"
    assert active(metric_reader) == 0
    spans = Spans(otel.get_finished_spans())
    markers = [f"[[ac{i}]]" for i in range(N)]
    roots = assert_one_trace_per_kickoff(spans, fake_provider, markers)
    for root in roots.values():
        assert root.end_time >= last_chat_end(spans, root)


def test_caller_timeout_keeps_the_kickoff_open_until_its_thread_finishes(
    otel, metric_reader, fake_provider
):
    # every run's first model call waits until the callers have stopped waiting
    gate = fake_provider.gate("timeout")
    hold_each(fake_provider, gate, [f"to{i}" for i in range(N)])
    timeout = 0.3

    async def main() -> int:
        crews = [research_crew(lambda: make_llm(fake_provider.base_url)) for _ in range(N)]
        try:
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(c.kickoff_async(inputs={"topic": f"[[to{i}]]"}), timeout)
                    for i, c in enumerate(crews)
                ),
                return_exceptions=True,
            )
            cancelled_at = time.time_ns()
            assert all(isinstance(r, asyncio.TimeoutError) for r in results), results
            with ThreadPoolExecutor(1) as waiter:  # not the loop's executor: the runs use it
                await asyncio.get_running_loop().run_in_executor(
                    waiter, gate.wait_parked, N, WAIT_S
                )
            assert active(metric_reader) == N, "the worker threads still run the kickoffs"
            assert not kickoffs(Spans(otel.get_finished_spans())), "none ended at the timeout"
        finally:
            gate.open()
        return cancelled_at  # asyncio.run returns once the worker threads are done

    cancelled_at = asyncio.run(main())
    assert active(metric_reader) == 0

    spans = Spans(otel.get_finished_spans())
    markers = [f"[[to{i}]]" for i in range(N)]
    roots = assert_one_trace_per_kickoff(spans, fake_provider, markers)
    for root in roots.values():
        events = [e.name for e in root.events]
        assert a.EVENT_CALLER_CANCELLED in events
        assert root.end_time > cancelled_at
        assert root.end_time >= last_chat_end(spans, root), "ends after the last model call"
        assert len(spans.kids(root, "crewai.task")) == 2


def test_streaming_flows_from_threads_are_one_trace_each(
    otel, metric_reader, fake_provider, monkeypatch
):
    """A streaming Flow (crewai 1.15: ``StreamSession``, 1.12: ``FlowStreamingOutput``)."""
    # A streaming flow prints to the console, which asks PyPI for a newer CrewAI.
    monkeypatch.setenv("CREWAI_DISABLE_VERSION_CHECK", "true")
    from crewai.flow.flow import Flow, start

    class ReportFlow(Flow):
        stream = True

        @start()
        def research(self) -> str:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            return str(crew.kickoff(inputs={"topic": self.state["topic"]}).raw)

    def run(i: int) -> Any:
        streaming = ReportFlow().kickoff(inputs={"topic": f"[[fl{i}]]"})
        list(streaming)
        return streaming.result

    def run_all() -> list[Any]:
        results: list[Any] = [None] * N
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, run(i))) for i in range(N)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    gate = fake_provider.gate("flows")
    hold_each(fake_provider, gate, [f"fl{i}" for i in range(N)])
    with when_parked(gate, N, lambda: active(metric_reader)) as seen:
        results = run_all()
    assert seen == [N], "every flow's crew inside its first model call"
    assert active(metric_reader) == 0
    spans = Spans(otel.get_finished_spans())
    roots = assert_one_trace_per_kickoff(spans, fake_provider, [f"[[fl{i}]]" for i in range(N)])
    for root in roots.values():
        assert attr(root, "crewai.kickoff.entrypoint") == "flow.kickoff"
        crews = [s for s in spans.descendants(root) if s.name == "invoke_workflow research"]
        assert len(crews) == 1
        assert root.end_time >= crews[0].end_time

    crew_otel.uninstrument()
    assert run_all() == results
