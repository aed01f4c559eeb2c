"""The context switch the hooks attach and detach with (``crew_otel.context.context_switch``):
the ContextVar's own ``set``/``reset`` when the API's default runtime context is in use, with
tokens that are the API's, so crew_otel's attaches and other code's detaches (and the reverse)
nest as they would with ``opentelemetry.context`` alone."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from opentelemetry import context

from crew_otel.context import API_CONTEXT_SWITCH, ContextSwitch, context_switch


def _nest(switch: ContextSwitch, label: str) -> list[object]:
    """Attach two contexts, one with the switch and one with the API, in both orders; what
    each level reads."""
    seen: list[object] = []
    outer = switch.attach(context.set_value("level", f"{label}-outer"))
    inner = context.attach(context.set_value("level", f"{label}-inner"))
    seen.append(context.get_value("level"))
    switch.detach(inner)  # the API's token, reset by the switch
    seen.append(context.get_value("level"))
    context.detach(outer)  # the switch's token, detached by the API
    seen.append(context.get_value("level"))
    return seen


def test_the_switchs_tokens_are_the_apis_in_threads_and_on_the_event_loop():
    switch = context_switch()
    assert switch is not API_CONTEXT_SWITCH, "the default runtime context is in use here"
    results: dict[str, list[object]] = {}
    barrier = threading.Barrier(4)

    def in_thread(label: str) -> None:
        barrier.wait()  # the four threads nest at the same time
        results[label] = _nest(switch, label)

    threads = [threading.Thread(target=in_thread, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def on_loop() -> None:
        attached: list[str] = []
        all_attached = asyncio.Event()

        async def task(label: str) -> None:
            outer = switch.attach(context.set_value("level", f"{label}-outer"))
            attached.append(label)
            if len(attached) == 4:
                all_attached.set()
            await all_attached.wait()  # every task attaches before any detaches
            seen = [context.get_value("level")]
            context.detach(outer)
            seen.append(context.get_value("level"))
            results[label] = seen

        await asyncio.gather(*(task(f"a{i}") for i in range(4)))

    asyncio.run(on_loop())
    for i in range(4):
        assert results[f"t{i}"] == [f"t{i}-inner", f"t{i}-outer", None]
        assert results[f"a{i}"] == [f"a{i}-outer", None]
    assert context.get_value("level") is None


def test_a_token_from_another_context_raises_in_the_switch_and_is_logged_by_the_api(
    caplog: pytest.LogCaptureFixture,
):
    """The contract the hooks' ``finally`` blocks rely on: the switch's ``detach`` raises where
    the API's logs, so a hook falls back to the API's (it logs, nothing reaches the app)."""
    switch = context_switch()
    tokens: list[object] = []
    thread = threading.Thread(target=lambda: tokens.append(switch.attach(context.Context())))
    thread.start()
    thread.join()
    with pytest.raises(ValueError):
        switch.detach(tokens[0])
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        context.detach(tokens[0])  # type: ignore[arg-type]
    assert "Failed to detach context" in caplog.text
