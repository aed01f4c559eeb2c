"""The half-fixed pattern: every CrewAI object built per request, state still shared by the tool.

This service follows the article's fix for the CrewAI objects (each request builds its own
LLM, tool and Agent, takes its request ID from ``X-Request-ID`` and retries with backoff), but
the tool code still keeps the article's module-level ``shared_context`` and writes one fixed
``report.json`` path. Building the tool per request does not help: the state lives in the
module, not in the tool. Under concurrent load the requests overwrite each other's ticket, so a
request can answer with another request's ticket (HTTP 200, wrong answer), and the report file
holds whichever request wrote last. crew_otel names the global and the file, with the requests
that shared them, in the traces.

Run it (with any OpenAI-compatible endpoint in OPENAI_BASE_URL)::

    OTEL_SERVICE_NAME=support-api-halffixed python examples/halffixed_service.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
from crewai import LLM, Agent, Crew, Task
from crewai.tools import tool
from fastapi import FastAPI, Header
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

import crew_otel
from crew_otel.sdk import Setup

crew_otel.instrument()  # the SDK is set up by the process that serves the app

# HALF-FIXED: the tool is built per request, but its state is still module-level.
shared_context = {"attempts": 0, "ticket": None}  # shared mutable state
REPORT_PATH = os.path.join(os.environ.get("REPORT_DIR", tempfile.gettempdir()), "report.json")
TICKET_SYSTEM_LATENCY = float(os.environ.get("TICKET_SYSTEM_LATENCY", "0.2"))


def export_report(data: dict[str, object]) -> str:
    """Write the ticket report (BAD: every request writes the same file)."""
    with open(REPORT_PATH, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    return REPORT_PATH


def build_llm() -> LLM:
    return LLM(
        model=os.environ.get("MODEL", "gpt-4o-mini"),
        base_url=os.environ.get("OPENAI_BASE_URL"),
        timeout=float(os.environ.get("LLM_TIMEOUT", "30")),
        max_retries=2,  # the SDK backs off between attempts
    )


def make_tool():
    @tool("ticket_history")
    def ticket_history(ticket: str) -> str:
        """Look up the history of a support ticket."""
        shared_context["attempts"] += 1
        shared_context["ticket"] = ticket  # remembered for the rest of the run...
        time.sleep(TICKET_SYSTEM_LATENCY)  # ...while the ticket system answers
        history = f"history of {shared_context['ticket']}: two earlier incidents"
        path = export_report({"ticket": shared_context["ticket"], "history": history})
        return f"attempt={shared_context['attempts']} {history} (report: {path})"

    return ticket_history


def build_crew() -> Crew:
    agent = Agent(
        role="Support Analyst",
        goal="Resolve incidents",
        backstory="Handles customer issues",
        llm=build_llm(),
        tools=[make_tool()],
        verbose=False,
    )
    task = Task(
        description="Investigate ticket {ticket}",
        expected_output="A resolution for the ticket",
        agent=agent,
    )
    return Crew(agents=[agent], tasks=[task], verbose=False)


def is_transient(exc: BaseException) -> bool:
    """Provider errors worth one more try: rate limits, 5xx, timeouts, dropped connections."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, ConnectionError))


telemetry: Setup | None = None  # set by configure() below when run as a script


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # Flush telemetry here: uvicorn re-raises SIGTERM after its graceful shutdown, so atexit
    # handlers (and code after uvicorn.run) never run and the last spans and metric points
    # would be lost.
    if telemetry is not None:
        telemetry.shutdown(timeout_millis=5000)  # traces and metrics, 5 s at most in total


app = FastAPI(title="support-api (half-fixed)", lifespan=lifespan)
FastAPIInstrumentor.instrument_app(app, excluded_urls="health")


class Ticket(BaseModel):
    ticket: str


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/tickets")
async def investigate(ticket: Ticket, x_request_id: str | None = Header(default=None)) -> dict:
    with crew_otel.request(x_request_id or None) as request_id:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(2),
            wait=wait_exponential(multiplier=0.2, max=2),
            retry=retry_if_exception(is_transient),
            reraise=True,
        ):
            with attempt:
                result = await build_crew().kickoff_async(inputs={"ticket": ticket.ticket})
    return {"result": result.raw, "request_id": request_id}


if __name__ == "__main__":
    import uvicorn

    telemetry = crew_otel.configure(service_name="support-api-halffixed")
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
