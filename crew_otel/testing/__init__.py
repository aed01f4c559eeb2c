"""Test helpers for CrewAI services: a fault-injecting OpenAI-compatible provider on 127.0.0.1.

Reproduce intermittent provider failures in your own test suite without any network::

    from crew_otel.testing import FakeOpenAIProvider, Fault

    def test_survives_provider_500s(fake_provider):      # fixture from the pytest plugin
        fake_provider.script(Fault.error(500), Fault.error(500))
        crew = build_crew(llm=LLM(model="gpt-4o-mini", base_url=fake_provider.base_url,
                                  api_key="sk-fake"))
        crew.kickoff(inputs={"topic": "[[req-1]]"})

The pytest plugin (``crew_otel.testing.plugin``, loaded automatically when crew-otel is
installed) provides the fixtures ``fake_provider`` and ``span_exporter``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crew_otel.testing.provider import (
        FakeOpenAIProvider,
        Fault,
        Gate,
        RandomFaults,
        RecordedRequest,
    )

__all__ = ["FakeOpenAIProvider", "Fault", "Gate", "RandomFaults", "RecordedRequest"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: the pytest plugin lives in this package, and pytest loads it in every
    # run of every project that installs crew-otel.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from crew_otel.testing import provider

    value = getattr(provider, name)
    globals()[name] = value
    return value
