"""The request ID across a process boundary: an opt-in W3C baggage entry ``crew_otel.request.id``.

When a web process hands a crew run to a queue worker (Celery) or calls another service, the
W3C propagators carry the trace (``traceparent``) but not crew_otel's request ID, which lives in
the OpenTelemetry Context. With ``propagate_request_id=True`` (``CREW_OTEL_PROPAGATE_REQUEST_ID``)
the propagator that :func:`crew_otel.instrument` installs translates at the boundary:

* **inject** (sending): outside a CrewAI run, the current request ID is added to the outgoing
  ``baggage`` as ``crew_otel.request.id``. Inside a run (a kickoff or a model call in progress)
  the entry is always removed, so model providers, embeddings APIs and tools' HTTP calls never
  see it, whatever the option says.
* **extract** (receiving): the entry is taken out of the incoming baggage and becomes the
  request ID of the extracted context, so the receiving side's spans (the Celery task span,
  the server span) and every kickoff under them continue the same ID. The value goes through
  :func:`crew_otel.context.normalize_request_id` like any client-supplied ID.

Both sides must opt in: the sender to add the entry, the receiver to adopt it.
"""

from __future__ import annotations

import logging

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from crew_otel import attributes as a
from crew_otel.context import KICKOFF_KEY, LLM_CALL_KEY, REQUEST_ID_KEY, normalize_request_id

_logger = logging.getLogger("crew_otel")

REQUEST_ID_BAGGAGE_KEY = a.REQUEST_ID
"""The W3C baggage entry that carries the request ID (``crew_otel.request.id``)."""


def inside_run(ctx: Context) -> bool:
    """Whether ``ctx`` belongs to a CrewAI run in progress (a kickoff or a model call)."""
    return ctx.get(KICKOFF_KEY) is not None or ctx.get(LLM_CALL_KEY) is not None


def outgoing(ctx: Context, propagate_request_id: bool) -> Context:
    """The context to inject from ``ctx``: the request-ID entry added or removed.

    Inside a run the entry is removed (requests made during a run go to model providers and
    tools' services); outside a run, when ``propagate_request_id`` is on, the current request
    ID is added. Otherwise ``ctx`` is returned as it is.
    """
    if inside_run(ctx):
        if baggage.get_baggage(REQUEST_ID_BAGGAGE_KEY, ctx) is not None:
            return baggage.remove_baggage(REQUEST_ID_BAGGAGE_KEY, ctx)
        return ctx
    if not propagate_request_id:
        return ctx
    request_id = ctx.get(REQUEST_ID_KEY)
    if not isinstance(request_id, str):
        return ctx
    return baggage.set_baggage(REQUEST_ID_BAGGAGE_KEY, request_id, ctx)


def incoming(ctx: Context) -> Context:
    """The extracted ``ctx`` with the request-ID entry moved from the baggage to the request ID.

    Without the entry (or with an unusable value) ``ctx`` is returned as it is.
    """
    value = baggage.get_baggage(REQUEST_ID_BAGGAGE_KEY, ctx)
    if value is None:
        return ctx
    ctx = baggage.remove_baggage(REQUEST_ID_BAGGAGE_KEY, ctx)
    request_id = normalize_request_id(value)
    if request_id is None:
        _logger.debug("crew_otel: incoming request ID baggage entry unusable; ignored")
        return ctx
    return otel_context.set_value(REQUEST_ID_KEY, request_id, ctx)
