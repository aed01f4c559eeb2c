"""MCP tools: a token on the server's command line never reaches a span or a metric."""

from __future__ import annotations

import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from crew_otel import attributes as a
from crew_otel.testing.crews import make_agent, make_llm
from tests.spans import Spans, attr

pytest.importorskip("mcp", reason="CrewAI's MCP support needs the mcp package (crewai[mcp])")

SECRET = "ghp_S3cretTokenValue0123456789"

SERVER = textwrap.dedent(
    """
    import sys
    from mcp.server.fastmcp import FastMCP

    assert "--token" in sys.argv  # the server takes its token on the command line
    server = FastMCP("tickets")

    @server.tool()
    def get_ticket(ticket_id: str) -> str:
        \"\"\"Fetch a ticket by its ID.\"\"\"
        return f"ticket {ticket_id}: printer on fire"

    server.run()
    """
)


def test_mcp_server_token_stays_out_of_span_names_attributes_and_metrics(
    otel, fake_provider, metric_reader, tmp_path: Path
):
    from crewai import Crew, Task
    from crewai.mcp import MCPServerStdio

    script = tmp_path / "tickets_server.py"
    script.write_text(SERVER)

    def run(i: int) -> str:
        server = MCPServerStdio(command=sys.executable, args=[str(script), "--token", SECRET])
        agent = make_agent(make_llm(fake_provider.base_url), "Support", mcps=[server])
        task = Task(
            description=f"Look up the ticket [[mcp{i}]] with the tool",
            expected_output="the ticket",
            agent=agent,
        )
        return Crew(agents=[agent], tasks=[task]).kickoff().raw

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, range(3)))
    assert all("printer on fire" in raw or "mcp" in raw for raw in results)
    # the provider saw CrewAI's tool name, built from the command line (that is CrewAI's doing)
    spans = Spans(otel.get_finished_spans())
    tools = spans.named("execute_tool")
    assert len(tools) == 3, [s.name for s in spans.all]
    for span in tools:
        assert span.name == "execute_tool get_ticket"
        assert attr(span, a.GEN_AI_TOOL_NAME) == "get_ticket"
        assert attr(span, a.CREWAI_TOOL_SOURCE) == "mcp"
        assert attr(span, a.CREWAI_MCP_SERVER_NAME) == "python"
    for span in spans.all:
        assert SECRET.lower() not in span.name.lower()
        for value in span.attributes.values():
            assert SECRET.lower() not in str(value).lower()
    data = metric_reader.get_metrics_data()
    assert data is not None
    assert SECRET.lower() not in data.to_json().lower()
    assert '"get_ticket"' in data.to_json(), "the tool's duration is recorded under its name"


@pytest.mark.parametrize(
    ("server_name", "label"),
    [
        ("npx_-y_@modelcontextprotocol/server-github_--token_ghp_x1", "npx"),
        ("/usr/bin/python3_server.py_--api-key=sk-123", "python_server.py"),
        ("uvx_mcp-server-fetch", "uvx_mcp-server-fetch"),
        ("api_example_com_mcp", "api_example_com"),
        ("mcp_10_0_0_1_8000_mcp", "mcp"),
        ("node_SECRETSECRET42", "node"),
        ("", "mcp"),
    ],
)
def test_server_label_keeps_only_words_that_cannot_be_secrets(server_name: str, label: str):
    assert a.mcp_server_label(server_name) == label
