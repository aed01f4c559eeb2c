"""Context growth: CrewAI's handling of a conversation that outgrew the model's window.

When the provider rejects a request as too long, CrewAI either summarises the conversation and
carries on (``respect_context_window=True``, the default; if the loop then ends without another
model call the agent silently returns "Agent completed execution but produced no final
output.") or raises ``SystemExit`` (``respect_context_window=False``), which ``except
Exception`` handlers in web frameworks do not catch. Each case is flagged on the agent's span
by the hook on ``handle_context_length`` (:mod:`crew_otel.wrappers.context_window`); this
module tells the silent fallback from a real answer.
"""

from __future__ import annotations

from crew_otel import internals


def is_no_final_output(result: object) -> bool:
    """Whether an agent result is CrewAI's silent fallback after a context overflow."""
    text = result if isinstance(result, str) else getattr(result, "raw", None)
    return internals.NO_FINAL_OUTPUT_MESSAGE.matches(text)
