"""Threads and requests: a thread carries a run's context only while that can still be right.

A thread that one request creates lazily and that later requests reuse (a queue worker, a
``multiprocessing.pool.ThreadPool``, a ``ThreadPoolExecutor``) must never record their work with
the first request's ID or inside its trace. Pool work and ``queue.Queue`` items carry the
context of the code that submitted them; work whose request cannot be known is a root span
without a request ID. Threads started per run, whose target is the run's own work, stay in
their run.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.pool import Pool, ThreadPool
from typing import Any

import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

import crew_otel
from tests.spans import REQUEST_ID, Spans, attr
from tests.workloads import run_requests

_TAGGED_URL = re.compile(r"/(queue|pool|executor|thread|timer|perrunpool)-([\w-]+)/models")


def _get_status(url: str) -> int:
    return httpx.get(url, timeout=10).status_code


class QueueWorker:
    """An application helper: one worker thread, started on first use, serves every caller."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, queue.Queue[Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def fetch(self, url: str) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="app-queue", daemon=True)
                self._thread.start()
        done: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._queue.put((url, done))
        result = done.get(timeout=30)
        if isinstance(result, BaseException):
            raise result
        return int(result)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            url, done = item
            try:
                done.put(_get_status(url))
            except Exception as exc:
                done.put(exc)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)


class Helpers:
    """Long-lived, lazily created workers shared by every request (module globals in an app)."""

    def __init__(self) -> None:
        self.queue_worker = QueueWorker()
        self._lock = threading.Lock()
        self._pool: ThreadPool | None = None
        self._executor: ThreadPoolExecutor | None = None

    def pool(self) -> ThreadPool:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPool(2)
            return self._pool

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2)
            return self._executor

    def close(self) -> None:
        self.queue_worker.close()
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
        if self._executor is not None:
            self._executor.shutdown()


@pytest.fixture
def helpers() -> Iterator[Helpers]:
    shared = Helpers()
    yield shared
    shared.close()


def fetch_tool(body: Callable[[], str]) -> Any:
    from crewai.tools import tool

    @tool("fetch_status")
    def fetch_status(query: str) -> str:
        """Fetch the status of the upstream service."""
        return body()

    return fetch_status


def shared_workers_tool(helpers: Helpers, base_url: str, tag: str) -> Any:
    def body() -> str:
        statuses = [
            helpers.queue_worker.fetch(f"{base_url}/queue-{tag}/models"),
            helpers.pool().apply(_get_status, (f"{base_url}/pool-{tag}/models",)),
            helpers.pool().map(_get_status, [f"{base_url}/pool-{tag}/models"])[0],
            helpers.executor().submit(_get_status, f"{base_url}/executor-{tag}/models").result(),
        ]
        return f"statuses {statuses}"

    return fetch_tool(body)


def per_run_threads_tool(base_url: str, tag: str) -> Any:
    def body() -> str:
        statuses: list[int] = []
        worker = threading.Thread(
            target=lambda: statuses.append(_get_status(f"{base_url}/thread-{tag}/models"))
        )
        worker.start()
        worker.join()
        timer = threading.Timer(
            0.01, lambda: statuses.append(_get_status(f"{base_url}/timer-{tag}/models"))
        )
        timer.start()
        timer.join()
        with ThreadPool(2) as pool:
            statuses += pool.map(_get_status, [f"{base_url}/perrunpool-{tag}/models"] * 2)
        return f"statuses {statuses}"

    return fetch_tool(body)


def url_of(span: ReadableSpan) -> str:
    return str(attr(span, "url.full") or attr(span, "http.url") or "")


def tagged_gets(spans: Spans) -> list[tuple[str, str, ReadableSpan]]:
    """(mechanism, request tag, span) for each HTTP span the test's helpers made."""
    found = []
    for span in spans.named("GET"):
        match = _TAGGED_URL.search(url_of(span))
        if match:
            found.append((match.group(1), match.group(2), span))
    return found


def root_of(spans: Spans, tag: str) -> ReadableSpan:
    roots = [r for r in spans.named("invoke_workflow") if attr(r, REQUEST_ID) == f"req-{tag}"]
    assert len(roots) == 1, tag
    return roots[0]


def test_threads_created_by_one_request_do_not_carry_it_into_later_requests(
    otel, fake_provider, helpers
):
    def make_tool(tag: str) -> Any:
        return shared_workers_tool(helpers, fake_provider.base_url, tag)

    run_requests(fake_provider, make_tool, ["A"], [])  # creates every worker thread
    run_requests(fake_provider, make_tool, ["B", "C"], ["D", "E"])

    spans = Spans(otel.get_finished_spans())
    gets = tagged_gets(spans)
    assert {(mechanism, tag) for mechanism, tag, _ in gets} == {
        (mechanism, tag)
        for mechanism in ("queue", "pool", "executor")
        for tag in ("A", "B", "C", "D", "E")
    }
    first = root_of(spans, "A")
    first_trace = first.context.trace_id
    assert all(
        attr(s, REQUEST_ID) == "req-A" for s in spans.all if s.context.trace_id == first_trace
    )
    for mechanism, tag, span in gets:
        if tag == "A":
            # the run that created the threads: its own work is in its trace
            assert attr(span, REQUEST_ID) == "req-A", mechanism
            assert span.context.trace_id == first_trace, mechanism
            continue
        assert attr(span, REQUEST_ID) != "req-A", (mechanism, tag)
        assert span.context.trace_id != first_trace, (mechanism, tag)
        # pool work and a queue.Queue item carry the context of the code that submitted them
        assert attr(span, REQUEST_ID) == f"req-{tag}", (mechanism, tag)
        root = root_of(spans, tag)
        assert span.context.trace_id == root.context.trace_id, (mechanism, tag)
        assert any(p.name == "execute_tool fetch_status" for p in spans.ancestors(span))


def test_threads_started_per_run_stay_in_their_run(otel, fake_provider):
    def make_tool(tag: str) -> Any:
        return per_run_threads_tool(fake_provider.base_url, tag)

    run_requests(fake_provider, make_tool, ["P", "Q"], ["R", "S"])

    spans = Spans(otel.get_finished_spans())
    gets = tagged_gets(spans)
    assert len(gets) == 4 * 4
    for mechanism, tag, span in gets:
        root = root_of(spans, tag)
        assert attr(span, REQUEST_ID) == f"req-{tag}", (mechanism, tag)
        assert span.context.trace_id == root.context.trace_id, (mechanism, tag)
        assert any(p.name == "execute_tool fetch_status" for p in spans.ancestors(span))


def test_a_thread_outliving_its_run_makes_roots_once_the_run_ended(otel, fake_provider):
    """A thread started in a run, doing more work after the run's kickoff returned."""
    tracer = trace.get_tracer("my.app")
    go_on = threading.Event()
    spans_made = threading.Event()
    started: list[threading.Thread] = []

    def background() -> None:
        with tracer.start_as_current_span("my.during"):
            pass
        go_on.wait(timeout=30)
        with tracer.start_as_current_span("my.after"):
            # a thread started from the stale thread is no better informed
            inner = threading.Thread(target=lambda: tracer.start_span("my.nested").end())
            inner.start()
            inner.join()
        spans_made.set()

    def body() -> str:
        if not started:
            started.append(threading.Thread(target=background, daemon=True))
            started[0].start()
        return "started"

    run_requests(fake_provider, lambda tag: fetch_tool(body), ["T"], [])
    go_on.set()
    assert spans_made.wait(timeout=30)
    started[0].join(timeout=10)

    spans = Spans(otel.get_finished_spans())
    root = root_of(spans, "T")
    (during,) = spans.named("my.during")
    assert attr(during, REQUEST_ID) == "req-T"
    assert during.context.trace_id == root.context.trace_id
    for name in ("my.after", "my.nested"):
        (span,) = spans.named(name)
        assert attr(span, REQUEST_ID) is None, name
        assert span.context.trace_id != root.context.trace_id, name
    assert spans.named("my.after")[0].parent is None


def test_context_outside_runs_is_carried_as_before(otel):
    key = otel_context.create_key("my.app.value")
    seen: list[object] = []
    token = otel_context.attach(otel_context.set_value(key, "outside-any-run"))
    try:
        worker = threading.Thread(target=lambda: seen.append(otel_context.get_value(key)))
        worker.start()
        worker.join()
        with ThreadPool(1) as pool:
            seen.append(pool.apply(otel_context.get_value, (key,)))
    finally:
        otel_context.detach(token)
    assert seen == ["outside-any-run", "outside-any-run"]


def _hooked() -> dict[str, object]:
    return {
        "Thread.start": threading.Thread.__dict__["start"],
        "Thread.run": threading.Thread.__dict__["run"],
        "Timer.start": threading.Timer.__dict__.get("start"),
        "Timer.run": threading.Timer.__dict__["run"],
        "ThreadPoolExecutor.submit": ThreadPoolExecutor.__dict__["submit"],
        **{f"Pool.{name}": Pool.__dict__[name] for name in _POOL_METHODS},
    }


_POOL_METHODS = ("apply_async", "_map_async", "imap", "imap_unordered")


def test_uninstrument_restores_the_thread_functions(otel_tracer_provider):
    crew_otel.uninstrument()
    before = _hooked()
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        during = _hooked()
        assert all(during[key] is not before[key] for key in before), "all hooked"
    finally:
        crew_otel.uninstrument()
    after = _hooked()
    assert all(after[key] is before[key] for key in before), "identity restored"


def test_threading_instrumentation_installed_after_crew_otel(
    otel_tracer_provider, span_exporter, fake_provider, helpers
):
    """``opentelemetry-instrument`` may load the threading instrumentation after crew_otel:
    its ``Thread.start`` hook is then outside crew_otel's."""
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    from crew_otel.threads import ThreadContextHooks

    crew_otel.uninstrument()
    before = _hooked()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, threading=False)
    hooks = ThreadContextHooks()
    hooks.install()
    ThreadingInstrumentor().instrument()
    try:

        def make_tool(tag: str) -> Any:
            return fetch_tool(
                lambda: str(
                    helpers.queue_worker.fetch(f"{fake_provider.base_url}/queue-{tag}/models")
                )
            )

        run_requests(fake_provider, make_tool, ["A"], [])
        run_requests(fake_provider, make_tool, ["B"], ["C"])
    finally:
        hooks.uninstall()
        ThreadingInstrumentor().uninstrument()
        crew_otel.uninstrument()
        # The instrumentation's unwrap (getattr, not __dict__) cannot take itself off a stack
        # of wrappers cleanly; put back what the rest of the session expects.
        threading.Thread.start = before["Thread.start"]  # type: ignore[method-assign]
        if "start" in threading.Timer.__dict__:
            del threading.Timer.start
    assert _hooked() == before
    spans = Spans(span_exporter.get_finished_spans())
    gets = {tag: span for _, tag, span in tagged_gets(spans)}
    assert set(gets) == {"A", "B", "C"}
    for tag in ("A", "B", "C"):  # each queue item in the request that put it
        assert attr(gets[tag], REQUEST_ID) == f"req-{tag}", tag
        assert gets[tag].context.trace_id == root_of(spans, tag).context.trace_id, tag


def test_thread_pools_imported_after_instrument_are_hooked_when_first_started(
    monkeypatch, otel_tracer_provider
):
    from crew_otel.context import current_request_id

    crew_otel.uninstrument()
    pool_module = sys.modules["multiprocessing.pool"]
    original = Pool.__dict__["apply_async"]
    monkeypatch.delitem(sys.modules, "multiprocessing.pool")  # as if not imported yet
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        assert Pool.__dict__["apply_async"] is original
        monkeypatch.setitem(sys.modules, "multiprocessing.pool", pool_module)
        with crew_otel.request("late-pool"), ThreadPool(1) as pool:
            seen = pool.apply(current_request_id)
        assert seen == "late-pool"
    finally:
        crew_otel.uninstrument()
    assert Pool.__dict__["apply_async"] is original


def test_a_thread_created_in_a_request_scope_carries_it_only_until_the_scope_exits(
    otel, fake_provider
):
    worker = QueueWorker()
    base = fake_provider.base_url
    try:
        with crew_otel.request("scope-A"):  # no kickoff: the handler's own helper thread
            worker.fetch(f"{base}/queue-A/models")

        def later(tag: str) -> None:
            with crew_otel.request(f"scope-{tag}"):
                worker.fetch(f"{base}/queue-{tag}/models")

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(later, ["B", "C"]))
    finally:
        worker.close()
    spans = Spans(otel.get_finished_spans())
    by_tag = {tag: span for _, tag, span in tagged_gets(spans)}
    assert set(by_tag) == {"A", "B", "C"}
    assert attr(by_tag["A"], REQUEST_ID) == "scope-A", "inside the scope it carries it"
    for tag in ("B", "C"):
        # never the scope-A request's ID: the request that put the item
        assert attr(by_tag[tag], REQUEST_ID) == f"scope-{tag}"
        assert by_tag[tag].context.trace_id != by_tag["A"].context.trace_id
