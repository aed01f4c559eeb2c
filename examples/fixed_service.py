"""The fixed pattern: everything built per request, request-scoped IDs, retries with backoff.

Each request builds its own LLM, tool (state in a closure) and Agent, so no CrewAI object is
shared between requests in flight. The caller's ``X-Request-ID`` becomes the request ID of
every span of the run (``crew_otel.request``). Transient provider failures that outlast the
SDK's own retries are retried once more, with exponential backoff, with a fresh crew.

Run it (with any OpenAI-compatible endpoint in OPENAI_BASE_URL)::

    OTEL_SERVICE_NAME=support-api-fixed python examples/fixed_service.py
"""

from __future__ import annotations

import os
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


def build_llm() -> LLM:
    return LLM(
        model=os.environ.get("MODEL", "gpt-4o-mini"),
        base_url=os.environ.get("OPENAI_BASE_URL"),
        timeout=float(os.environ.get("LLM_TIMEOUT", "30")),
        max_retries=2,  # the SDK backs off between attempts
    )


def make_tool():
    attempts = {"count": 0}  # per-request state

    @tool("ticket_history")
    def ticket_history(ticket: str) -> str:
        """Look up the history of a support ticket."""
        attempts["count"] += 1
        return f"attempt={attempts['count']} history of {ticket}: two earlier incidents"

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
    # (kickoffs in flight back at 0, the last runs counted) would be lost.
    if telemetry is not None:
        telemetry.shutdown(timeout_millis=5000)  # traces and metrics, 5 s at most in total


app = FastAPI(title="support-api (fixed)", lifespan=lifespan)
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

    telemetry = crew_otel.configure(service_name="support-api-fixed")
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
