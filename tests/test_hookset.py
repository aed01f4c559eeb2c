"""One way to install and remove a hook (``crew_otel.hookset.HookSet``), and ``doctor`` listing
every function crew_otel replaced in the process."""

from __future__ import annotations

import threading
import types
from typing import Any

import wrapt
from rich.console import Console

import crew_otel
from crew_otel.cli import doctor
from crew_otel.hookset import HookSet


def _passing(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def _other_passing(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def _third_passing(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return wrapped(*args, **kwargs)


def _module() -> types.ModuleType:
    module = types.ModuleType("hooked")

    def target(x: int) -> int:
        return x + 1

    module.target = target  # type: ignore[attr-defined]
    return module


def test_install_and_remove_restore_the_original_and_a_slot_is_hooked_once() -> None:
    module = _module()
    original = module.target
    hooks = HookSet("test")
    assert hooks.wrap(module, "target", _passing) is not None
    assert hooks.wrap(module, "target", _other_passing) is None  # one hook per slot and set
    assert isinstance(module.target, wrapt.FunctionWrapper)
    assert module.target(1) == 2
    assert [hook.where for hook in hooks.hooks()] == ["hooked.target"]
    hooks.remove_all()
    assert module.target is original
    assert hooks.hooks() == ()
    assert hooks.wrap(module, "missing", _passing) is None  # nothing to hook: nothing installed


def test_a_wrapper_another_library_put_on_top_stays_and_ours_is_not_doubled() -> None:
    module = _module()
    hooks = HookSet("test")
    hooks.wrap(module, "target", _passing)
    ours = module.target
    theirs = wrapt.FunctionWrapper(ours, _other_passing)
    module.target = theirs
    hook = hooks.hooks()[0]
    assert not hook.in_place
    hooks.remove_all()
    assert module.target is theirs  # their chain is left intact (ours inside is inert)
    # Installing again finds our wrapper inside theirs: no second one on top.
    assert hooks.wrap(module, "target", _passing) is None
    assert module.target is theirs
    # A different wrapper callable is a different hook: it goes on top.
    assert hooks.wrap(module, "target", _third_passing) is not None
    assert module.target is not theirs


def test_concurrent_installs_of_one_slot_install_one_hook() -> None:
    module = _module()
    hooks = HookSet("test")
    barrier = threading.Barrier(8)
    installed: list[object] = []

    def install() -> None:
        barrier.wait()
        installed.append(hooks.wrap(module, "target", _passing))

    threads = [threading.Thread(target=install) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len([hook for hook in installed if hook is not None]) == 1
    inner = module.target.__wrapped__
    assert not isinstance(inner, wrapt.FunctionWrapper)  # wrapped once
    hooks.remove_all()


def test_doctor_lists_every_function_crew_otel_replaced(otel_tracer_provider: Any) -> None:
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        console = Console(record=True, width=400, color_system=None)
        console.print(doctor.replaced_functions_table())
        listing = console.export_text()
    finally:
        crew_otel.uninstrument()
    assert "crewai.crew.Crew.kickoff " in listing
    assert "builtins.open" in listing  # the shared-state watcher's openers
    assert "threading.Thread.start" in listing  # the thread hooks
    assert "wrapped again" not in listing
    after = Console(record=True, width=400, color_system=None)
    after.print(doctor.replaced_functions_table())
    assert "crewai.crew.Crew.kickoff" not in after.export_text()
