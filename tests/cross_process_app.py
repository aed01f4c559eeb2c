"""A Celery app whose worker runs crews: the receiving side of test_cross_process.py.

The worker is started by the test (``celery -A tests.cross_process_app worker``) with
``CROSS_PROCESS_WORKER=1``: it configures the SDK with ``crew_otel.configure()`` (OTLP to the
test's receiver, options from ``CREW_OTEL_*``) and instruments Celery. The test process imports
this module only to send the task.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

TASK_NAME = "crew_otel_cross.run_crew"

app = Celery("crew_otel_cross")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)

if os.environ.get("CROSS_PROCESS_WORKER") == "1":
    from crew_otel.testing.crews import prepare_offline_environment

    prepare_offline_environment()

    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    import crew_otel

    crew_otel.configure(service_name="crew-worker")
    CeleryInstrumentor().instrument()

    # As a service warms up: CrewAI and its model client are first imported here, not by the
    # pool's threads racing on the first tasks (seen once under load: "partially initialized
    # module 'httpx2' has no attribute 'URL'" in one of them).
    from crew_otel.testing.crews import make_llm

    make_llm("http://127.0.0.1:9/v1")


@app.task(name=TASK_NAME)
def run_crew(base_url: str, topic: str) -> dict[str, Any]:
    """Kick off the research crew against ``base_url``; report the request ID seen at start."""
    from crew_otel.context import current_request_id
    from crew_otel.testing.crews import make_llm, research_crew

    at_start = current_request_id()
    result = research_crew(lambda: make_llm(base_url)).kickoff(inputs={"topic": topic})
    return {"raw": str(result.raw), "request_id_at_start": at_start}
