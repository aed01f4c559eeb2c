"""MCP errors are origins on the MCP tool's ``execute_tool`` span, under concurrent runs.

The test starts a real MCP stdio server (the ``mcp`` package's FastMCP) per tool call, as CrewAI
does, in one of three modes chosen on its command line: its tool raises (the server answers
with an ``isError`` result, which CrewAI hands to the model as text), it exits while the tool
runs, or it fails to start for the call (after tool discovery worked). Requests run at once,
half with ``kickoff`` in threads and half with ``akickoff`` on one event loop. CrewAI hands
every one of these errors back to the model, so each run succeeds and its one origin is
recovered; the server's token (on its command line) and the tool's error text stay out of
spans and metrics.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from crew_otel import attributes as a
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr, traces_by_marker, whole_run
from tests.support.metrics import points, total
from tests.workloads import kickoff_concurrently, outcome_summary

pytest.importorskip("mcp", reason="CrewAI's MCP support needs the mcp package (crewai[mcp])")

SECRET = "ghp_McpS3cretToken0123456789"
TOOL_SECRET = "sk-toolErrorText987654321"

SERVER = textwrap.dedent(
    """
    import os
    import sys

    mode = sys.argv[sys.argv.index("--mode") + 1]
    started = sys.argv[sys.argv.index("--started") + 1]
    assert "--token" in sys.argv  # the server takes its token on the command line
    if mode == "no_start" and os.path.exists(started):
        sys.exit(3)  # discovery worked; the server started for the call fails

    from mcp.server.fastmcp import FastMCP

    server = FastMCP("tickets")

    @server.tool()
    def get_ticket(ticket_id: str) -> str:
        \"\"\"Fetch a ticket by its ID.\"\"\"
        if mode == "raise":
            raise ValueError(f"ticket store refused {TOOL_SECRET!r}")
        if mode == "exit":
            os._exit(7)
        return f"ticket {ticket_id}: printer on fire"

    open(started, "w").close()
    server.run()
    """
).replace("{TOOL_SECRET!r}", repr(TOOL_SECRET))

#: marker -> the server's mode (the first two kick off in threads, the rest with akickoff)
MODES = {
    "mcpraise0": "raise",
    "mcpnostart0": "no_start",
    "mcpraise1": "raise",
    "mcpexit1": "exit",
}
N_THREADS = 2
#: error.type of each mode: the MCP conventions' ``tool_error`` for an isError result, else
#: the MCP client's error (not the RuntimeError CrewAI wraps it in)
ERROR_TYPES = {"raise": "tool_error", "no_start": "MCPConnectionError", "exit": "ConnectionError"}


def error_types() -> dict[str, str]:
    """:data:`ERROR_TYPES` for the installed CrewAI (1.12 raises a plain ConnectionError when
    the server does not start: it has no MCPConnectionError)."""
    try:
        import crewai.mcp.exceptions  # noqa: F401
    except ImportError:
        return {**ERROR_TYPES, "no_start": "ConnectionError"}
    return ERROR_TYPES


def test_mcp_errors_are_origins_on_the_mcp_tool_span(
    otel, fake_provider, metric_reader, tmp_path: Path
):
    from crewai import Crew, Task
    from crewai.mcp import MCPServerStdio

    script = tmp_path / "tickets_server.py"
    script.write_text(SERVER)

    def make_crew(marker: str, run: str = "traced") -> Any:
        started = tmp_path / f"{run}-{marker}.started"
        server = MCPServerStdio(
            command=sys.executable,
            args=[
                *(str(script), "--mode", MODES[marker]),
                *("--started", str(started), "--token", SECRET),
            ],
        )
        agent = make_agent(make_llm(fake_provider.base_url), "Support", mcps=[server])
        task = Task(
            description=f"Look up the ticket [[{marker}]] with the tool",
            expected_output="the ticket",
            agent=agent,
        )
        return Crew(name="support", agents=[agent], tasks=[task])

    markers = list(MODES)
    expected = error_types()
    outcomes = kickoff_concurrently(make_crew, markers, N_THREADS)
    for marker in markers:
        assert not isinstance(outcomes[marker], BaseException), outcomes[marker]
        assert f"[[{marker}]]" in outcomes[marker].raw

    spans = Spans(otel.get_finished_spans())
    for marker, run in traces_by_marker(spans, fake_provider, markers).items():
        whole_run(run, "invoke_workflow support")
        (tool,) = run.named("execute_tool")
        assert tool.name == "execute_tool get_ticket"
        assert attr(tool, a.CREWAI_TOOL_SOURCE) == "mcp"
        assert attr(tool, a.CREWAI_MCP_SERVER_NAME) == "python"
        assert tool.status.status_code is StatusCode.ERROR, marker
        assert attr(tool, a.ERROR_TYPE) == expected[MODES[marker]], marker
        assert attr(tool, a.ERROR_ORIGIN) is True, marker
        assert attr(tool, a.ERROR_RECOVERED) is True, marker
        # (a loaded machine may add a recovered HTTP attempt that timed out: not the tool's)
        origins = [s for s in run.all if attr(s, a.ERROR_ORIGIN) and s.name != "POST"]
        assert origins == [tool], [(marker, s.name, attr(s, a.ERROR_TYPE)) for s in origins]
        assert not [
            s for s in run.all if attr(s, a.ERROR_ORIGIN) and not attr(s, a.ERROR_RECOVERED)
        ]
        assert run.roots()[0].status.status_code is not StatusCode.ERROR
        for span in run.all:
            texts = [span.name, span.status.description or "", *map(str, span.attributes.values())]
            texts += [str(v) for event in span.events for v in event.attributes.values()]
            for text in texts:
                assert SECRET not in text, span.name
                assert TOOL_SECRET not in text, span.name

    found = points(metric_reader)
    origins = found["crew_otel.error.origins"]
    for error_type in set(expected.values()):
        modes = [mode for mode in MODES.values() if expected[mode] == error_type]
        assert total(
            origins,
            crew_otel__origin__operation="execute_tool",
            error__type=error_type,
            crew_otel__error__recovered="true",
        ) == len(modes), error_type
    tool_durations = found["gen_ai.execute_tool.duration"]
    assert total(tool_durations, gen_ai__tool__name="get_ticket", error__type="tool_error") == 2
    data = metric_reader.get_metrics_data()
    assert data is not None
    assert SECRET not in data.to_json()
    assert TOOL_SECRET not in data.to_json()

    # the same runs without instrumentation: the same outcome
    import crew_otel

    crew_otel.uninstrument()
    baseline = kickoff_concurrently(lambda m: make_crew(m, "baseline"), markers, N_THREADS)
    assert {m: outcome_summary(o) for m, o in outcomes.items()} == {
        m: outcome_summary(o) for m, o in baseline.items()
    }
