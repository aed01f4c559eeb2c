"""``crew_otel.request``: client data never raises, generators keep their request, and one
request object shared by threads or tasks gives each its own previous context back.

Request IDs come from clients (``X-Request-ID``): whatever arrives is turned into a usable ID
or replaced by a new one, never an exception in the application's handler.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import crew_otel
from crew_otel.context import MAX_REQUEST_ID_LENGTH, current_request_id
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr

GENERATED = re.compile(r"^[0-9a-f]{16}$")


class HostileStr:
    def __str__(self) -> str:
        raise RuntimeError("secret-in-__str__")


class StrSubclass(str):
    def __str__(self) -> str:
        raise RuntimeError("hostile str subclass")


# value given to request(...) -> expected ID (None: a generated one)
CLIENT_VALUES: list[tuple[Any, str | None]] = [
    (None, None),
    ("", None),
    ("   \t ", None),
    ("\x00\x01\x7f", None),
    (b"", None),
    (b"\xff\xfe\xfd", None),  # not UTF-8
    (HostileStr(), None),
    ("  padded-id \n", "padded-id"),
    ("line\r\nbreak", "linebreak"),
    ("x" * 10_000, "x" * MAX_REQUEST_ID_LENGTH),
    (123, "123"),
    (b"bytes-id", "bytes-id"),
    (uuid.UUID(int=7), str(uuid.UUID(int=7))),
    (StrSubclass("sub-id"), "sub-id"),
    ("caf\u00e9-\u00ff\u00fe", "caf\u00e9-\u00ff\u00fe"),
]


@pytest.mark.parametrize(("value", "expected"), CLIENT_VALUES)
def test_any_client_value_gives_a_usable_request_id(value: Any, expected: str | None) -> None:
    scope = crew_otel.request(value)
    with scope as request_id:
        assert current_request_id() == request_id
    assert current_request_id() is None
    assert isinstance(request_id, str)
    if expected is None:
        assert GENERATED.match(request_id), request_id
    else:
        assert request_id == expected


def test_decorator_accepts_client_values() -> None:
    @crew_otel.request(b"")
    def handler() -> str | None:
        return current_request_id()

    first, second = handler(), handler()
    assert first
    assert second
    assert GENERATED.match(first)
    assert first != second, "an unusable ID means a new one per entry"


def test_hostile_request_ids_under_concurrent_kickoffs(otel, fake_provider) -> None:
    values = [v for v, _ in CLIENT_VALUES]

    def run(i: int) -> str:
        with crew_otel.request(values[i]) as request_id:
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            crew.kickoff(inputs={"topic": f"[[h{i}]]"})
            return request_id

    with ThreadPoolExecutor(max_workers=5) as pool:
        used = list(pool.map(run, range(len(values))))
    spans = Spans(otel.get_finished_spans())
    roots = spans.named("invoke_workflow")
    assert sorted(attr(r, REQUEST_ID) for r in roots) == sorted(used)
    for root in roots:
        trace_ids = {
            attr(s, REQUEST_ID) for s in spans.all if s.context.trace_id == root.context.trace_id
        }
        assert trace_ids == {attr(root, REQUEST_ID)}
    assert all(len(r) <= MAX_REQUEST_ID_LENGTH and r.isprintable() and r for r in used)


# --- generators and async generators ----------------------------------------------------------
def test_request_decorator_on_generators_holds_for_the_whole_iteration(otel, fake_provider) -> None:
    @crew_otel.request("gen-fixed")
    def answers(n: int, tag: str):
        for i in range(n):
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            raw = crew.kickoff(inputs={"topic": f"[[{tag}{i}]]"}).raw
            yield raw, current_request_id()

    @crew_otel.request()
    def fresh(tag: str):
        yield current_request_id()
        crew = research_crew(lambda: make_llm(fake_provider.base_url))
        crew.kickoff(inputs={"topic": f"[[{tag}]]"})
        yield current_request_id()

    def consume(tag: str) -> list[str | None]:
        seen = []
        for _raw, request_id in answers(2, tag):
            seen.append(request_id)
            assert current_request_id() is None, "the consumer's context is untouched"
        return seen

    with ThreadPoolExecutor(max_workers=3) as pool:
        seen = list(pool.map(consume, ["ga", "gb", "gc"]))
    assert seen == [["gen-fixed", "gen-fixed"]] * 3
    ids = list(fresh("gf"))
    assert ids[0] == ids[1], "one new ID per iteration"
    assert ids[0]
    assert GENERATED.match(ids[0])

    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    assert len(roots) == 7
    assert sorted(attr(r, REQUEST_ID) for r in roots) == sorted(["gen-fixed"] * 6 + [ids[0]])


def test_generator_close_and_throw_run_inside_the_request() -> None:
    seen: list[str | None] = []

    @crew_otel.request("gen-close")
    def body():
        try:
            while True:
                try:
                    yield current_request_id()
                except ValueError:
                    seen.append(f"thrown:{current_request_id()}")
        finally:
            seen.append(f"closed:{current_request_id()}")

    gen = body()
    assert next(gen) == "gen-close"
    assert gen.throw(ValueError("x")) == "gen-close"
    gen.close()
    assert seen == ["thrown:gen-close", "closed:gen-close"]
    assert current_request_id() is None


def test_request_decorator_on_async_generators(otel, fake_provider) -> None:
    @crew_otel.request("agen-fixed")
    async def answers(n: int, tag: str):
        for i in range(n):
            crew = research_crew(lambda: make_llm(fake_provider.base_url))
            result = await crew.akickoff(inputs={"topic": f"[[{tag}{i}]]"})
            yield result.raw, current_request_id()

    async def consume(tag: str) -> list[str | None]:
        seen = []
        async for _raw, request_id in answers(2, tag):
            seen.append(request_id)
            assert current_request_id() is None
        return seen

    async def main() -> list[list[str | None]]:
        return list(await asyncio.gather(*(consume(t) for t in ("aa", "ab", "ac"))))

    assert asyncio.run(main()) == [["agen-fixed", "agen-fixed"]] * 3
    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    assert [attr(r, REQUEST_ID) for r in roots] == ["agen-fixed"] * 6


# --- one request object, many threads and tasks ----------------------------------------------
def test_one_request_object_entered_by_several_threads(otel, fake_provider) -> None:
    job = crew_otel.request("batch-7")
    workers = 4
    inside = threading.Barrier(workers)
    after: dict[int, tuple[str | None, str]] = {}

    def worker(i: int) -> None:
        with job as request_id:
            assert request_id == "batch-7"
            inside.wait(timeout=10)  # every thread is inside before any leaves
            research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
                inputs={"topic": f"[[j{i}]]"}
            )
        # back outside: this thread's own context, and a later kickoff gets its own ID
        with crew_otel.request(f"later-{i}") as later:
            research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
                inputs={"topic": f"[[l{i}]]"}
            )
        after[i] = (current_request_id(), later)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert after == {i: (None, f"later-{i}") for i in range(workers)}
    roots = Spans(otel.get_finished_spans()).named("invoke_workflow")
    ids = sorted(attr(r, REQUEST_ID) for r in roots)
    assert ids == sorted(["batch-7"] * workers + [f"later-{i}" for i in range(workers)])


def test_one_request_object_entered_by_several_tasks_and_nested() -> None:
    job = crew_otel.request("batch-async")
    tasks = 4

    async def main() -> list[tuple[str | None, str | None, str | None]]:
        inside: list[int] = []
        all_inside = asyncio.Event()
        turns = [asyncio.Event() for _ in range(tasks)]
        turns[0].set()
        nested = [asyncio.Event() for _ in range(tasks)]

        async def task(i: int) -> tuple[str | None, str | None, str | None]:
            with job:
                inside.append(i)
                if len(inside) == tasks:
                    all_inside.set()
                await all_inside.wait()  # every task is inside before any leaves
                await turns[i].wait()  # the first in re-enters first, then the next
                with job:  # re-entered by the same task
                    nested[i].set()
                    if i + 1 < tasks:
                        # the next task re-enters while this one is still inside its own
                        turns[i + 1].set()
                        await nested[i + 1].wait()
                inner = current_request_id()
            return inner, current_request_id(), None

        return list(await asyncio.gather(*(task(i) for i in range(tasks))))

    assert asyncio.run(main()) == [("batch-async", None, None)] * tasks
    assert current_request_id() is None


def test_exit_in_a_context_that_never_entered_is_harmless() -> None:
    job = crew_otel.request("never-entered")
    job.__exit__(None, None, None)
    assert current_request_id() is None
