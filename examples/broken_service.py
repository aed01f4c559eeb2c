"""The broken pattern: one Agent, LLM and tool at module level, shared by every request.

This is the service from "How to fix intermittent 500 errors when scaling CrewAI": it works
when requests come one at a time and returns intermittent 500s under concurrent load, because
every request runs through the same Agent (CrewAI keeps its executor, retry counter and
interpolated texts on it), the same LLM object (usage counters) and a tool with shared mutable
state. crew_otel names the shared objects in the traces.

Run it (with any OpenAI-compatible endpoint in OPENAI_BASE_URL)::

    OTEL_SERVICE_NAME=support-api-broken python examples/broken_service.py
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from crewai import LLM, Agent, Crew, Task
from crewai.tools import tool
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from pydantic import BaseModel

import crew_otel
from crew_otel.sdk import Setup

crew_otel.instrument()  # the SDK is set up by the process that serves the app

# BROKEN: shared across every request in flight.
llm = LLM(
    model=os.environ.get("MODEL", "gpt-4o-mini"),
    base_url=os.environ.get("OPENAI_BASE_URL"),
    timeout=float(os.environ.get("LLM_TIMEOUT", "30")),
)
shared_context = {"attempts": 0}  # shared mutable state


@tool("ticket_history")
def ticket_history(ticket: str) -> str:
    """Look up the history of a support ticket."""
    shared_context["attempts"] += 1  # not thread-safe, and leaks between requests
    return f"attempt={shared_context['attempts']} history of {ticket}: two earlier incidents"


agent = Agent(
    role="Support Analyst",
    goal="Resolve incidents",
    backstory="Handles customer issues",
    llm=llm,
    tools=[ticket_history],
    verbose=False,
)


telemetry: Setup | None = None  # set by configure() below when run as a script


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # Flush telemetry here: uvicorn re-raises SIGTERM after its graceful shutdown, so atexit
    # handlers (and code after uvicorn.run) never run and the last spans and metric points
    # (kickoffs in flight back at 0, the last runs counted) would be lost.
    if telemetry is not None:
        telemetry.shutdown(timeout_millis=5000)  # traces and metrics, 5 s at most in total


app = FastAPI(title="support-api (broken)", lifespan=lifespan)
FastAPIInstrumentor.instrument_app(app, excluded_urls="health")


class Ticket(BaseModel):
    ticket: str


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/tickets")
async def investigate(ticket: Ticket) -> dict[str, str]:
    task = Task(
        description="Investigate ticket {ticket}",
        expected_output="A resolution for the ticket",
        agent=agent,  # the shared Agent
    )
    crew = Crew(agents=[agent], tasks=[task], verbose=False)
    result = await asyncio.to_thread(crew.kickoff, inputs={"ticket": ticket.ticket})
    return {"result": result.raw}


if __name__ == "__main__":
    import uvicorn

    telemetry = crew_otel.configure(service_name="support-api-broken")
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
