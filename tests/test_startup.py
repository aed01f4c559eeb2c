"""Start-up: what ``import crew_otel`` and ``instrument()`` import, and what installs later.

Each test runs a fresh Python process (the test process has long imported everything): the
import must leave the SDK, exporters and ``rich`` out; ``instrument()`` imports no HTTP client
module, and the HTTP layer (and targets of CrewAI modules imported on first use) installs when
the application imports them - in the importing thread, so concurrent first runs get their
HTTP attempt spans - and never after ``uninstrument()``. Timings are the benchmarks' business.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

PRELUDE = """
import json, sys, threading
from crew_otel.testing.crews import prepare_offline_environment
prepare_offline_environment()
import crewai
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import crew_otel
from crew_otel import CrewAIInstrumentor
from crew_otel.http import HTTP_CLIENTS
import wrapt

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))

def http_reports():
    return {r.key: r.status for r in CrewAIInstrumentor().reports if r.layer == "http"}

def pool_wrapped(client):
    pools = sys.modules.get(client.pool_module)
    pool = getattr(pools, client.sync_pool, None)
    return isinstance(getattr(pool, "__dict__", {}).get("handle_request"), wrapt.FunctionWrapper)
"""


def run_fresh(script: str) -> dict[str, Any]:
    """Run ``PRELUDE + script`` in a new interpreter (strict mode); return its JSON line."""
    env = {**os.environ, "CREW_OTEL_STRICT": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_import_crew_otel_imports_neither_the_sdk_nor_exporters_nor_rich() -> None:
    script = """
    import json, sys
    import crew_otel
    heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "rich")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "rich" or m.startswith(heavy))
    configure = crew_otel.configure   # loads the SDK set-up on first access
    from crew_otel.sdk import configure as sdk_configure
    print(json.dumps({"loaded": loaded, "configure": configure is sdk_configure,
                      "sdk_after": "opentelemetry.sdk.trace" in sys.modules}))
    """
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], "import crew_otel needs only the OpenTelemetry API"
    assert result["configure"], "crew_otel.configure is crew_otel.sdk.configure"
    assert result["sdk_after"]


def test_http_layer_installs_when_the_application_first_imports_the_pool_under_threads() -> None:
    """instrument() leaves the HTTP layer pending; 4 concurrent first kickoffs import the
    connection pool (each builds its LLMs, racing for the first import): every model call of
    every run has its HTTP attempt span, made by the instrumentation installed meanwhile."""
    result = run_fresh(
        """
        from crew_otel.testing import FakeOpenAIProvider
        from crew_otel.testing.crews import make_llm, research_crew

        crew_otel.instrument(tracer_provider=provider)
        not_yet = [c.module for c in HTTP_CLIENTS if c.pool_module not in sys.modules]
        before = http_reports()
        errors, outputs = [], []
        with FakeOpenAIProvider() as fake:
            barrier = threading.Barrier(4)

            def run(i):
                try:
                    barrier.wait()
                    crew = research_crew(lambda: make_llm(fake.base_url))
                    outputs.append(str(crew.kickoff(inputs={"topic": f"topic{i}"})))
                except BaseException as exc:
                    errors.append(repr(exc))

            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        spans = exporter.get_finished_spans()
        chats = [s for s in spans if s.name.startswith("chat")]
        http = [
            s for s in spans
            if s.instrumentation_scope.name.startswith("opentelemetry.instrumentation.httpx")
        ]
        chat_ids = {c.context.span_id for c in chats}
        children = {s.parent.span_id for s in http if s.parent is not None}
        print(json.dumps({
            "not_yet": not_yet, "before": before, "after": http_reports(), "errors": errors,
            "outputs": len(outputs), "chats": len(chats),
            "chats_without_http": len(chat_ids - children),
            "http_outside_chats": sum(1 for s in http if s.parent is None
                                      or s.parent.span_id not in chat_ids),
            "request_ids": len({s.attributes.get("crew_otel.request.id") for s in http}),
        }))
        """
    )
    assert result["errors"] == []
    assert result["outputs"] == 4
    # The client the model calls use had not imported its connection pool at instrument().
    used = [key for key, status in result["after"].items() if status == "installed"]
    assert used, result["after"]
    for key in used:
        assert result["before"][key] == "pending", result["before"]
    assert result["chats"] == 4 * 3, "3 model calls per run"
    assert result["chats_without_http"] == 0, "every model call has its HTTP attempt"
    assert result["http_outside_chats"] == 0
    assert result["request_ids"] == 4, "each run's HTTP attempts carry its request ID"


def test_modules_imported_after_instrument_get_their_hooks_and_after_uninstrument_nothing() -> None:
    """A client module (and its pool) first imported after instrument() gets the HTTP layer
    (the hook runs in the importing thread), and ``crewai.lite_agent`` (not imported by
    ``import crewai``) its rows; what is first imported after uninstrument() gets nothing,
    though wrapt's post-import hooks stay registered."""
    result = run_fresh(
        """
        import importlib
        import importlib.util

        from crew_otel.instrumentor import _PEEKED_MODULES  # imported by instrument() itself

        spare = [
            c for c in HTTP_CLIENTS
            if importlib.util.find_spec(c.module) is not None and c.module not in _PEEKED_MODULES
            and c.module not in sys.modules and c.pool_module not in sys.modules
        ]
        lite_before = "crewai.lite_agent" in sys.modules
        crew_otel.instrument(tracer_provider=provider)
        imported_by_instrument = [c.module for c in spare if c.module in sys.modules]
        lite_report = {r.key: r.status for r in CrewAIInstrumentor().reports}.get(
            "crewai.lite_agent:LiteAgent.kickoff")
        lite_agent = importlib.import_module("crewai.lite_agent")
        lite_wrapped = isinstance(lite_agent.LiteAgent.__dict__["kickoff"], wrapt.FunctionWrapper)
        after_instrument = {}
        if spare:
            first = spare[0]
            module = importlib.import_module(first.module)
            module.Client().close()   # imports its connection pool
            after_instrument = {"status": http_reports()[first.key], "wrapped": pool_wrapped(first)}
        crew_otel.uninstrument()
        lite_restored = not isinstance(
            lite_agent.LiteAgent.__dict__["kickoff"], wrapt.FunctionWrapper)
        crew_otel.instrument(tracer_provider=provider)
        crew_otel.uninstrument()
        after_uninstrument = {}
        for client in HTTP_CLIENTS:
            if client.pool_module in sys.modules or importlib.util.find_spec(client.module) is None:
                continue
            module = importlib.import_module(client.module)
            module.Client().close()
            http_instrumentation = sys.modules.get("opentelemetry.instrumentation.httpx")
            instrumentor = getattr(http_instrumentation, client.instrumentor, None)
            after_uninstrument[client.key] = {
                "wrapped": pool_wrapped(client),
                "instrumented": bool(instrumentor
                                     and instrumentor().is_instrumented_by_opentelemetry),
            }
        peeked = {name: "URL" for name in _PEEKED_MODULES
                  if hasattr(sys.modules.get(name), "URL")}
        print(json.dumps({
            "peeked": peeked,
            "imported_by_instrument": imported_by_instrument,
            "after_instrument": after_instrument, "after_uninstrument": after_uninstrument,
            "lite": [lite_before, lite_report, lite_wrapped, lite_restored],
        }))
        """
    )
    assert result["imported_by_instrument"] == [], "instrument() imports no HTTP client"
    assert result["lite"] == [False, "pending", True, True]
    if result["after_instrument"]:
        assert result["after_instrument"] == {"status": "installed", "wrapped": True}
    for key, state in result["after_uninstrument"].items():
        assert state == {"wrapped": False, "instrumented": False}, key
    assert result["peeked"] == {"httpx2": "URL"} or not result["peeked"]


def test_instrument_imports_the_modules_other_libraries_peek_at() -> None:
    """openai >= 2 looks up ``httpx2`` in ``sys.modules`` in every client it builds; the HTTP
    instrumentation imports it. ``instrument()`` imports it (when installed) in its own thread,
    so a client built in another thread while crew_otel installs its HTTP layer never finds it
    half-initialised (seen in CI: ``partially initialized module 'httpx2' has no attribute
    'URL'``)."""
    result = run_fresh(
        """
        import importlib.util
        installed = importlib.util.find_spec("httpx2") is not None
        crew_otel.instrument(tracer_provider=TracerProvider())
        module = sys.modules.get("httpx2")
        print(json.dumps({"installed": installed, "imported": module is not None,
                          "complete": hasattr(module, "URL") if module else False}))
        """
    )
    assert result["imported"] == result["installed"]
    assert result["complete"] == result["installed"]


def test_an_http_client_imported_while_another_is_being_imported_installs_before_its_use() -> None:
    """Installing the HTTP layer imports the HTTP instrumentation, which imports every client:
    done inside one client's import while another thread imports the other client, it closed a
    cycle of import locks and Python handed a thread a half-initialised ``httpx2`` (a Celery
    worker's concurrent first tasks failed with ImportError). The hook then defers: the layer
    installs at the next kickoff or model call, outside any import, before the first HTTP
    attempt."""
    result = run_fresh(
        """
        import importlib.util, types
        from crew_otel.testing import FakeOpenAIProvider
        from crew_otel.testing.crews import make_llm, research_crew

        crew_otel.instrument(tracer_provider=provider)
        used = next(c for c in HTTP_CLIENTS if c.module in sys.modules)
        other = next(c for c in HTTP_CLIENTS if c is not used)
        # Another thread is importing the other client's pool right now (as Python marks it).
        busy = types.ModuleType(other.pool_module)
        busy.__spec__ = importlib.util.spec_from_loader(other.pool_module, loader=None)
        busy.__spec__._initializing = True
        real = sys.modules.get(other.pool_module)
        sys.modules[other.pool_module] = busy
        imported_inside_hook = []

        class Spy:
            def find_spec(self, name, path=None, target=None):
                pool = sys.modules.get(used.pool_module)
                if pool is not None and getattr(pool.__spec__, "_initializing", False):
                    imported_inside_hook.append(name)
                return None

        sys.meta_path.insert(0, Spy())
        with FakeOpenAIProvider() as fake:
            crew = research_crew(lambda: make_llm(fake.base_url))
            assert used.pool_module in sys.modules  # the LLMs imported the pool: hooks ran
            deferred = http_reports()[used.key]
            result = crew.kickoff(inputs={"topic": "[[first]]"})
        if real is None:
            del sys.modules[other.pool_module]
        else:
            sys.modules[other.pool_module] = real
        spans = exporter.get_finished_spans()
        chats = [s for s in spans if s.name.startswith("chat")]
        http = [s for s in spans
                if s.instrumentation_scope.name.startswith("opentelemetry.instrumentation.httpx")]
        print(json.dumps({
            "deferred": deferred, "after": http_reports()[used.key],
            "imported_inside_hook": [n for n in imported_inside_hook
                                     if n.startswith("opentelemetry.instrumentation")],
            "answered": "[[first]]" in str(result.raw),
            "chats": len(chats),
            "chats_with_http": len({s.parent.span_id for s in http if s.parent}
                                   & {c.context.span_id for c in chats}),
        }))
        """
    )
    assert result["imported_inside_hook"] == [], "the hook imported the HTTP instrumentation"
    assert result["deferred"] == "pending"
    assert result["after"] == "installed"
    assert result["answered"]
    assert result["chats"] == 3
    assert result["chats_with_http"] == 3, "the first run's model calls have their HTTP attempts"
