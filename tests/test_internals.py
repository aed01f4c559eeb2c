"""The registry of CrewAI/SDK internals: every accessor resolves on the installed versions,
a drifted one is reported (by ``check()`` and by ``crew-otel doctor``), readers never raise,
positional arguments are read by the installed signature, and no read bypasses the registry.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import crew_otel
from crew_otel import internals, internals_check
from crew_otel.cli import doctor
from crew_otel.internals import (
    REGISTRY,
    CallerFunction,
    ClassNames,
    MessageText,
    Parameters,
    Part,
    PrivateAttribute,
    PrivateFunction,
    TracerScope,
)

PACKAGE = Path(crew_otel.__file__).parent


def _render(statuses: list[internals_check.InternalStatus]) -> str:
    console = Console(record=True, width=400, color_system=None)
    console.print(doctor.internals_table(statuses))
    return console.export_text()


@pytest.mark.parametrize("internal", REGISTRY, ids=lambda i: i.name)
def test_every_registered_internal_resolves_here(internal: internals.Internal) -> None:
    """On the installed CrewAI/SDK, each accessor resolves, and each part that exists only in
    some versions is present exactly when its declaration says so."""
    status = internals_check.check(internal)
    assert status.version is not None, f"{internal.distribution} is not installed"
    assert status.ok, f"{internal.name}: {status.detail}"
    for part in status.parts:
        assert part.as_declared, (
            f"{internal.name}: {part.where} resolved={part.resolved} but "
            f"declared missing={part.declared_missing} in {status.version}"
        )


def test_registry_entries_are_documented_and_unique() -> None:
    names = [internal.name for internal in REGISTRY]
    assert len(names) == len(set(names))
    for internal in REGISTRY:
        assert internal.what, internal.name
        assert internal.checked_on, internal.name
        for part in internal.parts:
            # a version-limited part names versions it was actually checked on
            assert set(part.missing_in) <= set(internals.CHECKED_ON[internal.distribution])


def test_doctor_lists_every_internal_with_its_status() -> None:
    console = Console(record=True, width=400, color_system=None)
    doctor.run(console)
    output = console.export_text()
    assert "Internals read by the diagnoses" in output
    for internal in REGISTRY:
        line = next(line for line in output.splitlines() if f" {internal.name} " in line)
        assert "resolves" in line, line
        assert "missing" not in line, line


def _drifted() -> tuple[internals.Internal, ...]:
    """Accessors pointing at things the installed versions do not have."""
    return (
        # a real CrewAI class without the attribute
        PrivateAttribute(
            "task_times_executed", "drift", "_times_executed", (Part("crewai.task:Task"),)
        ),
        PrivateAttribute(
            "gone_class", "drift", "_times_executed", (Part("crewai.agent.core:NoSuchAgent"),)
        ),
        MessageText(
            "gone_message",
            "drift",
            "a message CrewAI never wrote",
            (Part("crewai.agent.core"),),
            whole=False,
        ),
        ClassNames("gone_stream", "drift", (Part("crewai.types.streaming:NoSuchStream"),)),
        Parameters(
            "gone_parameter",
            "drift",
            "crewai.utilities.agent_utils:handle_context_length",
            (Part("messages"), Part("no_such_parameter")),
            method=False,
        ),
        TracerScope("gone_tracer", "drift", "crew_otel.version", internals.CREWAI),
        CallerFunction("gone_caller", "drift", "crewai.crew:Crew.no_such_validator", depth=1),
        PrivateFunction(
            "gone_function",
            "drift",
            "asyncio:_no_such_function",
            internals._running_loop_fallback,
            internals.PYTHON,
        ),
        Parameters(
            "gone_sdk_parameter",
            "drift",
            "opentelemetry.sdk._shared_internal:BatchProcessor.shutdown",
            (Part("no_such_parameter"),),
            method=True,
            distribution=internals.OTEL_SDK,
        ),
        internals.AttributePath(
            "gone_wrapt_path",
            "drift",
            ("_self_no_such_wrapper",),
            "wrapt.FunctionWrapper",
            "function_wrapper",
            internals.WRAPT,
        ),
        internals.AttributePath(
            "gone_path",
            "drift",
            ("_default_executor", "_no_such_queue"),
            "asyncio event loop",
            "loop_with_default_executor",
            internals.PYTHON,
        ),
    )


@pytest.mark.parametrize("internal", _drifted(), ids=lambda i: i.name)
def test_an_accessor_that_stops_resolving_fails_check_and_shows_in_doctor(
    internal: internals.Internal,
) -> None:
    status = internals_check.check(internal)
    assert not status.ok
    assert status.detail.startswith("not found: ")
    output = _render(doctor.internal_statuses((internal,)))
    line = next(line for line in output.splitlines() if f" {internal.name} " in line)
    assert "missing" in line, line
    assert "resolves" not in line, line
    assert "not found" in output


def test_a_part_declared_missing_but_present_is_reported() -> None:
    """A wrong version declaration is visible too (the per-part test above relies on it)."""
    version = internals.installed_version(internals.CREWAI)
    assert version is not None
    declared = PrivateAttribute(
        "declared", "drift", "_times_executed", (Part("crewai.agent.core:Agent", (version,)),)
    )
    status = internals_check.check(declared)
    assert status.ok  # nothing expected here is missing ...
    assert not status.parts[0].as_declared  # ... but the declaration is wrong
    assert status.detail.startswith("declared missing here but present")


class _Hostile:
    """Everything raises: readers return None instead."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise RuntimeError(name)

    def __str__(self) -> str:
        raise RuntimeError("str")


def test_readers_never_raise_and_return_none_when_missing() -> None:
    hostile = _Hostile()
    assert internals.AGENT_TIMES_EXECUTED.read(hostile) is None
    assert internals.AGENT_TIMES_EXECUTED.read(object()) is None
    assert internals.STREAM_SYNC_ITERATOR.write(hostile, 1) is False
    assert internals.LOOP_EXECUTOR_QUEUE.read(None) is None
    assert internals.LOOP_EXECUTOR_QUEUE.read(hostile) is None
    assert internals.SDK_BATCH_QUEUE.read(object()) is None
    assert internals.EXECUTOR_BUSY_MESSAGE.read(hostile) is None
    assert internals.HTTPX_TRACER.read(hostile) is None
    assert not internals.HTTPX_TRACER.matches(object())
    assert not internals.STREAMING_OUTPUTS.matches(hostile)
    assert internals.CREW_KNOWLEDGE_INIT.on_stack() is False  # not called from a crew's init
    assert CallerFunction("none", "drift", "crewai.no_such_module:f", depth=3).on_stack() is False
    missing = Parameters("none", "drift", "crewai.no_such_module:f", (Part("x"),), method=False)
    arguments = missing.bind()  # no function: keyword arguments only
    assert arguments.names == ()
    assert arguments.get((1, 2), {"x": 3}, "x", None) == 3
    assert arguments.get((1, 2), {}, "x", "default") == "default"


def test_messages_match_as_crewai_words_them() -> None:
    busy = RuntimeError("Executor is already running. Cannot invoke the same executor instance")
    assert internals.EXECUTOR_BUSY_MESSAGE.matches(str(busy))
    assert internals.EXECUTOR_BUSY_MESSAGE.read(busy) == str(busy)
    placeholder = "Agent completed execution but produced no final output.\n"
    assert internals.NO_FINAL_OUTPUT_MESSAGE.matches(placeholder)
    assert not internals.NO_FINAL_OUTPUT_MESSAGE.matches("Final: " + placeholder)


def test_positional_arguments_are_bound_from_the_installed_signature() -> None:
    """The hooks read arguments at the positions the installed CrewAI has, not a copied list."""
    from crewai.llms.base_llm import BaseLLM
    from crewai.utilities import agent_utils

    context = internals.CONTEXT_LENGTH_ARGS.bind()
    expected = tuple(inspect.signature(agent_utils.handle_context_length).parameters)
    assert context.names == expected[: len(context.names)]
    messages = [{"role": "user", "content": "hi"}]
    args = tuple(messages if name == "messages" else None for name in context.names)
    assert context.get(args, {}, "messages", None) is messages
    assert context.get((), {"messages": messages}, "messages", None) is messages

    completed = internals.LLM_COMPLETED_ARGS.bind()
    params = list(inspect.signature(BaseLLM._emit_call_completed_event).parameters)
    assert params[0] == "self"
    assert completed.names == tuple(params[1:])
    values = completed.values(tuple(range(len(completed.names))), {"response_id": "r-1"})
    assert values["response_id"] == "r-1"
    if "finish_reason" in completed.names:  # crewai >= 1.15 passes it
        assert values["finish_reason"] == completed.names.index("finish_reason")


_REGISTERED_ATTRIBUTES = frozenset(
    attribute
    for internal in REGISTRY
    for attribute in (
        (internal.attribute,)
        if isinstance(internal, PrivateAttribute)
        else getattr(internal, "path", ())
    )
) | frozenset(  # private functions: asyncio._get_running_loop
    part.where.rpartition(":")[2]
    for internal in REGISTRY
    if isinstance(internal, PrivateFunction)
    for part in internal.parts
)
#: Signature checks belong in the registry (``Parameters``): an ``inspect.signature`` call
#: elsewhere is a hand-made check the doctor and the version test do not see.
_REGISTRY_ONLY_CALLS = frozenset({"signature"})
_REGISTERED_TEXTS = frozenset(
    internal.text for internal in REGISTRY if isinstance(internal, MessageText)
) | frozenset(
    name for internal in REGISTRY if isinstance(internal, ClassNames) for name in internal.names
)


def _scattered_reads(path: Path) -> list[str]:
    """Reads of registered internals that bypass :mod:`crew_otel.internals`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in _REGISTERED_ATTRIBUTES
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _REGISTRY_ONLY_CALLS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "inspect"
        ):
            found.append(f"{path.name}:{node.lineno} inspect.{node.func.attr}()")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and (
                node.value in _REGISTERED_ATTRIBUTES
                or any(text in node.value for text in _REGISTERED_TEXTS)
            )
        ):
            found.append(f"{path.name}:{node.lineno} {node.value!r}")
    return found


def test_no_read_of_a_registered_internal_bypasses_the_registry() -> None:
    """``getattr(x, "_times_executed")``, ``loop._default_executor``, ``thread._target``,
    ``wrapper._self_wrapper``, ``asyncio._get_running_loop()``, an ``inspect.signature`` check,
    a copied message text or class-name set outside :mod:`crew_otel.internals` would drift
    unseen by the test above."""
    found = [
        read
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "internals.py"
        for read in _scattered_reads(path)
    ]
    assert found == []


def test_stdlib_wrapt_and_sdk_accessors_read_what_they_name() -> None:
    """``Thread._target``, wrapt's ``_self_wrapper``, ``asyncio._get_running_loop`` and the SDK's
    ``BatchProcessor.shutdown(timeout_millis)``, each through its accessor."""
    import threading

    import wrapt
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    def work() -> None:
        pass

    assert internals.THREAD_TARGET.read(threading.Thread(target=work)) is work
    assert internals.THREAD_TARGET.read(_Hostile()) is None

    def hook(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    assert internals.WRAPT_WRAPPER.read(wrapt.FunctionWrapper(work, hook)) is hook
    assert internals.WRAPT_WRAPPER.read(_Hostile()) is None

    assert internals.RUNNING_LOOP.read() is None

    async def loop_inside() -> Any:
        return internals.RUNNING_LOOP.read()

    import asyncio

    assert isinstance(asyncio.run(loop_inside()), asyncio.AbstractEventLoop)
    assert internals.RUNNING_LOOP.function is asyncio._get_running_loop
    missing = PrivateFunction(
        "missing", "drift", "asyncio:_no_such", internals._running_loop_fallback, internals.PYTHON
    )
    assert missing.function is internals._running_loop_fallback
    assert missing.read() is None

    # the SDK's batch worker takes a time limit from 1.35 on (1.34.1 waits without one)
    processor = BatchSpanProcessor(InMemorySpanExporter())
    try:
        batch = internals.SDK_BATCH_PROCESSOR.read(processor)
        takes_limit = "timeout_millis" in inspect.signature(batch.shutdown).parameters
        assert internals.SDK_BATCH_SHUTDOWN_ARGS.accepts("timeout_millis") is takes_limit
        assert not internals.SDK_BATCH_SHUTDOWN_ARGS.accepts("no_such_parameter")
    finally:
        processor.shutdown()


def test_the_scan_finds_each_kind_of_scattered_read(tmp_path: Path) -> None:
    """The scan above would see a read of each registered internal written at a call site."""
    source = tmp_path / "scattered.py"
    source.write_text(
        "import asyncio, inspect\n"
        "def f(thread, wrapper, batch):\n"
        "    target = getattr(thread, '_target', None)\n"
        "    inner = wrapper._self_wrapper\n"
        "    loop = asyncio._get_running_loop()\n"
        "    takes = 'timeout_millis' in inspect.signature(batch.shutdown).parameters\n"
        "    return thread._target, target, inner, loop, takes\n"
    )
    assert sorted(_scattered_reads(source)) == [
        "scattered.py:3 '_target'",
        "scattered.py:4 ._self_wrapper",
        "scattered.py:5 ._get_running_loop",
        "scattered.py:6 inspect.signature()",
        "scattered.py:7 ._target",
    ]
