"""Pool work that already runs in a copy of its submitter's context skips the threading
instrumentation's attach and detach (``CopiedContextSubmitHook``); other pool work keeps it.

``asyncio.to_thread`` submits ``functools.partial(ctx.run, func)``: ``func`` runs in ``ctx``, a
copy of the submitter's context, whatever the pool's thread had current. CrewAI's agent executor
runs every step that way; the attach around it was pure cost.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

import crew_otel
from crew_otel.context import REQUEST_ID_KEY

_INSTRUMENTATION = "opentelemetry/instrumentation/threading"


def _seen_in_pool_thread() -> dict[str, Any]:
    """What the work sees: its request, its current span, whether the instrumentation's
    submit wrapper (its ``wrapped_func``, which attaches the submitter's context) called it."""
    frame = sys._getframe(1)
    wrapped = False
    while frame is not None:
        code = frame.f_code
        if code.co_name == "wrapped_func" and _INSTRUMENTATION in code.co_filename.replace(
            "\\", "/"
        ):
            wrapped = True
        frame = frame.f_back
    return {
        "request": otel_context.get_value(REQUEST_ID_KEY),
        "span": trace.get_current_span().get_span_context().span_id,
        "thread": threading.get_ident(),
        "through_instrumentation": wrapped,
    }


def _in_two_requests(work: Callable[[str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Two requests at once, each in a thread with a span of its own current, each running
    ``work(request_id)`` (which hands pool work over and returns what it saw); every request's
    pool work saw its own request and span, not through the instrumentation's attach."""
    tracer = trace.get_tracer("test")
    results: dict[str, dict[str, Any]] = {}
    spans: dict[str, int] = {}

    def one_request(request_id: str) -> None:
        with crew_otel.request(request_id), tracer.start_as_current_span(request_id) as span:
            spans[request_id] = span.get_span_context().span_id
            results[request_id] = work(request_id)

    callers = [threading.Thread(target=one_request, args=(f"req-{i}",)) for i in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=60)

    assert set(results) == {"req-0", "req-1"}
    for request_id, seen in results.items():
        assert seen["request"] == request_id
        assert seen["span"] == spans[request_id]
        assert seen["through_instrumentation"] is False, "the attach around it is skipped"
    return results


def test_to_thread_work_runs_in_its_run_without_the_instrumentations_attach(otel):
    both_in_pool = threading.Barrier(2, timeout=30)

    def work() -> dict[str, Any]:
        both_in_pool.wait()  # the two requests' pool work overlaps
        return _seen_in_pool_thread()

    _in_two_requests(lambda _request_id: asyncio.run(asyncio.to_thread(work)))


def test_other_pool_work_still_gets_the_submitters_context(otel):
    tracer = trace.get_tracer("test")
    with ThreadPoolExecutor(max_workers=1) as pool:
        with crew_otel.request("req-plain"), tracer.start_as_current_span("plain") as span:
            seen = pool.submit(_seen_in_pool_thread).result(timeout=30)
        assert seen["request"] == "req-plain"
        assert seen["span"] == span.get_span_context().span_id
        assert seen["through_instrumentation"] is True
        # Outside any run, the same pool thread works in the context current at submission.
        assert pool.submit(_seen_in_pool_thread).result(timeout=30)["request"] is None


def test_work_submitted_as_a_contexts_run_skips_the_attach_and_sees_its_submitter(otel):
    """CrewAI's event bus submits ``ctx.run, handler, ...`` (not a partial): the handler runs in
    ``ctx``, copied from the emitter's context just before, whatever the instrumentation
    attaches; two requests' submissions to one pool overlap and each sees its own."""
    both_in_pool = threading.Barrier(2, timeout=30)

    def handler(tag: str) -> dict[str, Any]:
        both_in_pool.wait()
        return {**_seen_in_pool_thread(), "tag": tag}

    with ThreadPoolExecutor(max_workers=2) as pool:

        def emit(request_id: str) -> dict[str, Any]:
            ctx = contextvars.copy_context()
            return pool.submit(ctx.run, handler, request_id).result(timeout=30)

        results = _in_two_requests(emit)
    assert all(seen["tag"] == request_id for request_id, seen in results.items())


def test_a_callable_that_only_looks_like_a_contexts_run_keeps_the_attach(otel):
    """Only a built-in ``Context.run`` is recognised: an object whose attributes claim to be
    one (its ``__getattr__`` is application code, never run by the check) goes through the
    instrumentation and sees the submitter's context."""

    class Impostor:
        __name__ = "run"

        def __init__(self) -> None:
            self.__self__ = otel_context.get_current()

        def __call__(self) -> dict[str, Any]:
            return _seen_in_pool_thread()

        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"looked up {name}")

    with ThreadPoolExecutor(max_workers=1) as pool, crew_otel.request("req-impostor"):
        seen = pool.submit(Impostor()).result(timeout=30)
    assert seen["request"] == "req-impostor"
    assert seen["through_instrumentation"] is True
