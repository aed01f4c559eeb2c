"""The ``crew-otel`` command: demo, report, doctor, --version (run as subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crew_otel.demo.driver import request_id
from crew_otel.version import __version__

CLI = shutil.which("crew-otel") or "crew-otel"


def crew_otel_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "crew_otel.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_version():
    result = crew_otel_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"crew-otel {__version__}"


def test_doctor_lists_versions_and_hooks():
    result = crew_otel_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "crewai" in result.stdout
    assert "opentelemetry-sdk" in result.stdout
    assert "crewai.crew:Crew.kickoff" in result.stdout
    assert "installed" in result.stdout
    # rows that do not apply to the installed CrewAI say why
    assert "skipped" in result.stdout
    assert "not importable" in result.stdout or "not defined" in result.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("demo")
    out, summary, svg = workdir / "spans.jsonl", workdir / "summary.json", workdir / "t.svg"
    result = crew_otel_cli(
        "demo",
        "--requests",
        "20",
        "--concurrency",
        "8",
        "--seed",
        "1",
        "--out",
        str(out),
        "--summary-json",
        str(summary),
        "--svg",
        str(svg),
    )
    return {"result": result, "out": out, "summary": summary, "svg": svg}


def test_demo_runs_offline_and_names_the_shared_agent(demo_run):
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(demo_run["summary"].read_text())
    broken = figures["services"]["support-api-broken"]
    fixed = figures["services"]["support-api-fixed"]
    assert broken["requests"] == fixed["requests"] == 20
    assert figures["services"]["support-api-halffixed"]["requests"] == 20
    assert figures["client_requests"] == 60

    # the broken service shares its Agent between requests; the fixed one shares nothing
    assert broken["conflicts"], "shared-instance conflicts named for the broken service"
    agent_conflicts = [c for c in broken["conflicts"] if c["kind"] == "agent"]
    assert agent_conflicts
    assert agent_conflicts[0]["name"] == "Support Analyst"
    assert len(agent_conflicts[0]["request_ids"]) >= 2
    assert fixed["conflicts"] == []
    # CrewAI >= 1.14 refuses the concurrent use ("Executor is already running": HTTP 500s);
    # older versions let the requests interleave silently. Failures, when there are any, are
    # attributed to the shared Agent.
    if broken["failed"]:
        assert any(c.startswith("a shared Agent 'Support Analyst'") for c in broken["causes"])
    # one request at a time never failed
    assert broken["by_concurrency"]["1"][1] == 0

    # provider 500s appear as origins, and the traces account for every provider request
    origins = [o for s in figures["services"].values() for o in s["origins"]]
    assert any(o["span"] == "HTTP attempt" and o["error_type"] == "500" for o in origins)
    assert figures["provider_requests"] == sum(
        s["http_attempts"] for s in figures["services"].values()
    )

    text = result.stdout
    assert "support-api-broken" in text
    assert "support-api-fixed" in text
    assert "Overlap timeline" in text
    if broken["failed"]:
        assert "requests failed; " in text
        assert "failed runs by cause: shared_instance " in broken["conclusion"]
        assert "✗" in text
    else:
        assert "shared object(s) were used by concurrent requests" in text
    assert demo_run["svg"].read_text().lstrip().startswith("<svg")


def test_every_failed_request_of_the_broken_service_is_the_shared_agent(demo_run):
    """Each failed request of the broken service is one failed run whose cause is the shared
    Agent (crew_otel.failure.cause=shared_instance, naming it), but for any run the provider
    failed after every retry (a fatal HTTP 500 origin: provider_error); the report's count
    by cause is what the service's crew_otel.failures metric counted. CrewAI 1.12 lets the
    requests share the Agent without failing: then nothing failed and nothing is counted."""
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(demo_run["summary"].read_text())
    broken = figures["services"]["support-api-broken"]
    provider_failed = sum(
        o["count"] for o in broken["origins"] if o["span"] == "HTTP attempt" and not o["recovered"]
    )
    expected = {
        "shared_instance": broken["failed"] - provider_failed,
        "provider_error": provider_failed,
    }
    assert broken["failed_runs_by_cause"] == {c: n for c, n in expected.items() if n}
    text = " ".join(result.stdout.replace("│", " ").split())
    metric = ", ".join(f"{c} {n}" for c, n in broken["failed_runs_by_cause"].items()) or "none"
    assert (
        f"counted by the services' crew_otel.failures metric: broken {metric}; halffixed none; "
        "fixed none." in text
    )
    shared = broken["failed_runs_by_cause"].get("shared_instance")
    if shared:
        assert broken["failure_shared"] == [
            {"cause": "shared_instance", "what": "Agent 'Support Analyst'", "runs": shared}
        ]
        assert f"Failed runs by cause: shared_instance {shared} (Agent 'Support Analyst')" in text
    for service in ("support-api-halffixed", "support-api-fixed"):
        assert figures["services"][service]["failed_runs_by_cause"] == {}


def test_demo_names_the_state_the_halffixed_service_still_shares(demo_run):
    """CrewAI objects built per request, but the tool keeps a module global and one file."""
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(demo_run["summary"].read_text())
    halffixed = figures["services"]["support-api-halffixed"]
    by_kind = {c["kind"]: c for c in halffixed["conflicts"]}
    # nothing CrewAI-made is shared: only the state the tool code keeps outside the objects
    assert set(by_kind) == {"global", "file"}, halffixed["conflicts"]
    assert by_kind["global"]["name"] == "halffixed_service.shared_context"
    assert by_kind["file"]["name"].endswith(os.sep + "report.json")
    sent = {request_id("halffixed", i) for i in range(20)}
    for conflict in by_kind.values():
        assert len(conflict["request_ids"]) >= 2
        assert set(conflict["request_ids"]) <= sent
        # the first four requests ran one at a time: none of them shared anything
        assert not {request_id("halffixed", i) for i in range(4)} & set(conflict["request_ids"])
    conclusion = halffixed["conclusion"]
    assert "a module global 'halffixed_service.shared_context' written by the tool code" in (
        conclusion
    )
    assert "keep tool state per request" in conclusion
    assert "give each request its own path" in conclusion
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "module global 'halffixed_service.shared_context'" in text
    assert "keep tool state per request" in text
    # the requests overwrote each other's ticket: some answers carry another request's ticket
    crossed = [
        r for r in figures["client_results"] if r["service"] == "halffixed" and r["foreign_ticket"]
    ]
    assert crossed, "no half-fixed answer carried another request's ticket"
    assert all(r["phase"] == "parallel" for r in crossed)
    assert not any(
        r["foreign_ticket"] for r in figures["client_results"] if r["service"] == "fixed"
    )
    assert "Successful answers carrying another request's ticket" in result.stdout
    # the fixed service: nothing shared at all
    assert figures["services"]["support-api-fixed"]["conflicts"] == []


def test_crew_otel_flags_exactly_the_halffixed_answers_carrying_another_ticket(demo_run):
    """The demo reads each answer for another request's ticket; crew_otel, inside the service,
    flags the runs that received another in-flight request's data: the same answers, request
    by request, where it entered (the tool result, then the model and the output) and why
    (the module global both requests wrote). The fixed service: none."""
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(demo_run["summary"].read_text())
    clients = figures["client_results"]
    crossed = {
        r["request_id"] for r in clients if r["service"] == "halffixed" and r["foreign_ticket"]
    }
    assert crossed, "no half-fixed answer carried another request's ticket"
    crosstalk = figures["services"]["support-api-halffixed"]["crosstalk"]
    assert set(crosstalk["request_ids"]) == crossed
    assert crosstalk["carrying"] == len(crossed)
    assert crosstalk["answers"] == sum(
        1 for r in clients if r["service"] == "halffixed" and r["status"] == 200
    )
    assert crosstalk["by_source"]["tool_result"] == len(crossed)
    # Every such answer is explained by what both requests touched: the module global (a
    # write confirmed when its tool call ends still names a writer whose run ended during the
    # call), and the fixed report.json.
    causes = {c["name"]: c["answers"] for c in crosstalk["causes"]}
    assert crosstalk["no_cause"] == 0
    assert causes["halffixed_service.shared_context"] == len(crossed)
    assert set(causes) <= {"halffixed_service.shared_context"} | {
        name for name in causes if name.endswith("report.json")
    }

    fixed = figures["services"]["support-api-fixed"]["crosstalk"]
    assert fixed["carrying"] == 0
    assert fixed["answers"] == 20
    assert not any(r["foreign_ticket"] for r in clients if r["service"] == "fixed")
    # the broken service: never more flagged than the answers carrying a concurrent ticket
    broken = figures["services"]["support-api-broken"]["crosstalk"]
    assert broken["carrying"] <= sum(
        1 for r in clients if r["service"] == "broken" and r["foreign_ticket"]
    )

    text = " ".join(result.stdout.replace("│", " ").split())
    assert f"Answers carrying another request's data: {len(crossed)} of " in text
    assert f"halffixed {len(crossed)} of {crosstalk['answers']}" in text
    assert "flagged by crew_otel: " in text
    conclusion = figures["services"]["support-api-halffixed"]["conclusion"]
    assert f"{len(crossed)} of {crosstalk['answers']} answers carried another request's data (" in (
        conclusion
    )
    assert f"module global 'halffixed_service.shared_context' in {len(crossed)}" in conclusion


def test_the_demo_fails_when_crew_otel_and_its_count_disagree() -> None:
    """The demo's check: an answer carrying a concurrent request's ticket that crew_otel did
    not flag is a disagreement; one carrying only the ticket of a request answered before it
    was sent (stale state, which crew_otel does not flag) is not."""
    import io

    from rich.console import Console

    from crew_otel.demo.driver import ClientResult, _print_crosstalk

    def answer(index: int, foreign: list[str], sent: float, answered: float) -> ClientResult:
        rid = request_id("halffixed", index)
        return ClientResult(
            "halffixed",
            index,
            "parallel",
            200,
            None,
            1.0,
            bool(foreign),
            rid,
            foreign,
            sent,
            answered,
        )

    console = Console(file=io.StringIO(), width=300)
    earlier = answer(0, [], 0.0, 1.0)
    concurrent = [answer(1, ["halffixed-10002"], 2.0, 3.0), answer(2, [], 2.0, 3.0)]
    assert _print_crosstalk(console, [], [earlier, *concurrent]) == [
        "halffixed: demo 1, crew_otel 0"
    ]
    assert "halffixed 1 of 3" in console.file.getvalue()  # type: ignore[attr-defined]
    stale = [answer(1, ["halffixed-10000"], 2.0, 3.0)]
    assert _print_crosstalk(console, [], [earlier, *stale]) == []


def test_report_on_the_demo_file_reproduces_the_same_figures(demo_run, tmp_path):
    summary = tmp_path / "report.json"
    result = crew_otel_cli("report", str(demo_run["out"]), "--summary-json", str(summary))
    assert result.returncode == 0, result.stderr
    from_demo = json.loads(demo_run["summary"].read_text())["services"]
    from_report = json.loads(summary.read_text())["services"]
    assert from_report == from_demo


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "ab"', "not valid JSON"),
        ('{"resourceMetrics": []}\n', "not OTLP trace data"),
        ("hello world\n", "not valid JSON"),
        ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 5}]}]}]}\n', "ID"),
        ('{"resourceSpans": []}\n', "no spans"),
        (b"\xff\xfe\x00binary", "not a text file"),
    ],
)
def test_report_on_bad_input_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "input.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = crew_otel_cli("report", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("crew-otel report: error: ")
    assert message in lines[0]


def test_report_on_a_missing_file(tmp_path):
    result = crew_otel_cli("report", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "No such file" in result.stderr


def test_report_reads_collector_style_base64_and_pretty_printed_files(tmp_path, demo_run):
    """The Collector file exporter writes one request per line; tools differ in ID encoding."""
    import base64

    first = json.loads(Path(demo_run["out"]).read_text().splitlines()[0])
    for resource in first["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps(first, indent=2))
    result = crew_otel_cli("report", str(path))
    assert result.returncode == 0, result.stderr
    assert "support-api-" in result.stdout


def test_doctor_after_instrument_says_crew_otel_instrumented_httpx(otel_tracer_provider):
    """In a process crew_otel instrumented, doctor's dry run does not call the httpx
    instrumentation crew_otel installed the application's; statuses stay those of the plan."""
    import httpcore  # noqa: F401 - imported: the HTTP rows install at instrument()
    import httpx  # noqa: F401
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    import crew_otel
    from crew_otel.cli import doctor
    from crew_otel.hook_kinds import Status
    from crew_otel.http import HTTP_CLIENTS

    key = HTTP_CLIENTS[0].key
    crew_otel.uninstrument()
    instrumentor = crew_otel.instrument(tracer_provider=otel_tracer_provider)
    try:
        reports = {r.key: r for r in instrumentor.reports}
        assert reports[key].status == Status.INSTALLED
        row = next(r for r in doctor.hook_statuses() if r.key == key)
        assert row.status == Status.INSTALLED
        assert "already instrumented by the application" not in row.detail
        assert row.detail == "HTTPXClientInstrumentor, installed by crew_otel"
        assert [(r.key, r.status) for r in doctor.hook_statuses()] == [
            (r.key, r.status) for r in instrumentor.reports
        ]
    finally:
        crew_otel.uninstrument()

    # the application instruments httpx itself: doctor says so, before and after instrument()
    HTTPXClientInstrumentor().instrument(tracer_provider=otel_tracer_provider)
    try:
        instrumentor = crew_otel.instrument(tracer_provider=otel_tracer_provider)
        try:
            row = next(r for r in doctor.hook_statuses() if r.key == key)
            assert row.status == Status.INSTALLED
            assert row.detail.startswith("already instrumented by the application")
        finally:
            crew_otel.uninstrument()
    finally:
        HTTPXClientInstrumentor().uninstrument()
