"""An application that knows nothing of crew_otel: run under ``opentelemetry-instrument``.

The loopback provider and the crew builder come from crew_otel.testing only to stay offline;
the application never calls crew_otel.instrument().
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from crew_otel.testing import FakeOpenAIProvider
from crew_otel.testing.crews import make_llm, research_crew

with FakeOpenAIProvider() as provider:

    def run(i: int) -> str:
        crew = research_crew(lambda: make_llm(provider.base_url))
        return crew.kickoff(inputs={"topic": f"[[auto{i}]]"}).raw

    with ThreadPoolExecutor(max_workers=2) as pool:
        print("RESULTS", list(pool.map(run, range(2))), flush=True)
