"""Compatibility: zero-code instrumentation, the HTTP client in use, CrewAI's own provider."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import crew_otel
from crew_otel.testing.crews import make_llm, research_crew
from tests.spans import REQUEST_ID, Spans, attr
from tests.support.processes import app_environment, console_spans

HERE = Path(__file__).resolve().parent


def run_under_opentelemetry_instrument(tmp_path: Path, **extra_env: str) -> list[dict]:
    command = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
    assert command, "opentelemetry-instrument is installed with the test dependencies"
    env = app_environment(
        tmp_path,
        checkout_on_path=False,
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="auto-app",
        **extra_env,
    )
    result = subprocess.run(
        [command, sys.executable, str(HERE / "auto_instrumented_app.py")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=HERE.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESULTS" in result.stdout
    assert "[[auto0]]" in result.stdout
    return console_spans(result.stdout)


def test_opentelemetry_instrument_loads_crew_otel_without_code_changes(tmp_path):
    spans = run_under_opentelemetry_instrument(tmp_path)
    kickoffs = [s for s in spans if s["name"] == "invoke_workflow research"]
    assert len(kickoffs) == 2
    request_ids = {s["attributes"][REQUEST_ID] for s in kickoffs}
    assert len(request_ids) == 2
    http = [s for s in spans if s["name"] == "POST"]
    assert len(http) == 6
    assert {s["attributes"].get(REQUEST_ID) for s in http} == request_ids
    assert any(s["name"].startswith("execute_tool ") for s in spans)


def test_opentelemetry_python_disabled_instrumentations_turns_it_off(tmp_path):
    spans = run_under_opentelemetry_instrument(
        tmp_path, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="crew_otel"
    )
    assert not [s for s in spans if s["name"].startswith(("invoke_workflow", "chat "))]
    http = [s for s in spans if s["name"] == "POST"]
    assert len(http) == 6, "the other instrumentations still run"
    assert all(REQUEST_ID not in s["attributes"] for s in http)


def test_http_spans_for_the_http_client_this_openai_uses(otel, fake_provider):
    import openai

    client_class = type(openai.OpenAI(api_key="sk-test")._client)
    expected = "httpx2" if int(openai.__version__.split(".")[0]) >= 3 else "httpx"
    assert any(c.__module__.split(".")[0] == expected for c in client_class.__mro__)
    research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(inputs={"topic": "[[h]]"})
    spans = Spans(otel.get_finished_spans())
    http = spans.named("POST")
    assert len(http) == fake_provider.stats()["requests"] == 3
    assert all(spans.parent(h).name.startswith("chat ") for h in http)
    assert all(attr(h, REQUEST_ID) for h in http)


def test_warns_when_crewai_owns_the_global_tracer_provider(monkeypatch, caplog):
    """crewai < 1.15.15 installs its telemetry provider as the global one at import."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    crewai_provider = TracerProvider(resource=Resource.create({"service.name": "crewAI-telemetry"}))
    crew_otel.uninstrument()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: crewai_provider)
    with caplog.at_level(logging.WARNING, logger="crew_otel"):
        crew_otel.instrument()
    crew_otel.uninstrument()
    (warning,) = [r for r in caplog.records if "CrewAI's own telemetry provider" in r.getMessage()]
    assert "CREWAI_DISABLE_TELEMETRY=true" in warning.getMessage()


@pytest.mark.parametrize("service", ["support-api", "crewAI"])
def test_no_warning_for_the_applications_own_provider(monkeypatch, caplog, service):
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    crew_otel.uninstrument()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    with caplog.at_level(logging.WARNING, logger="crew_otel"):
        crew_otel.instrument()
    crew_otel.uninstrument()
    assert not [r for r in caplog.records if "telemetry provider" in r.getMessage()]
