"""Which edition of the GenAI semantic conventions crew_otel's names follow.

The GenAI conventions are in Development and their names still move. OpenTelemetry's own GenAI
instrumentations handle a move the same way, and so does crew_otel:

* **default**: the released names, those of ``open-telemetry/semantic-conventions`` (v1.37.0
  and later, as shipped in ``opentelemetry-semantic-conventions``); where the conventions
  defined a thing only after they moved to ``open-telemetry/semantic-conventions-genai``
  (memory operations, ``plan``), its names as read from that repository's main branch;
* ``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental`` (a comma-separated list, as for
  every OTel opt-in): the names main has renamed since:

  - a retrieval's result limit is ``gen_ai.retrieval.top_k`` (released: ``gen_ai.request.top_k``);
  - a model call's duration is ``gen_ai.client.inference.duration`` (released: the
    ``gen_ai.client.operation.duration`` every operation shares, which embeddings keep);
  - a model call's tokens are ``gen_ai.client.inference.operation.input_tokens`` /
    ``.output_tokens`` (released: ``gen_ai.client.token.usage`` by ``gen_ai.token.type``).

The variable is read once, at the first use (:func:`refresh` reads it again, for tests).
``docs/genai-conventions.md`` lists the repository, files and commits each mode follows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OPT_IN_ENV = "OTEL_SEMCONV_STABILITY_OPT_IN"
LATEST_EXPERIMENTAL = "gen_ai_latest_experimental"

RETRIEVAL_TOP_K_RELEASED = "gen_ai.request.top_k"
RETRIEVAL_TOP_K_LATEST = "gen_ai.retrieval.top_k"
INFERENCE_DURATION_LATEST = "gen_ai.client.inference.duration"
INFERENCE_INPUT_TOKENS_LATEST = "gen_ai.client.inference.operation.input_tokens"
INFERENCE_OUTPUT_TOKENS_LATEST = "gen_ai.client.inference.operation.output_tokens"


class _Mode:
    """The mode, read from the environment at the first use."""

    __slots__ = ("latest",)

    def __init__(self) -> None:
        self.latest: bool | None = None


_mode = _Mode()


def _read(environ: Mapping[str, str]) -> bool:
    values = environ.get(OPT_IN_ENV, "")
    return LATEST_EXPERIMENTAL in {value.strip() for value in values.split(",")}


def latest_experimental() -> bool:
    """Whether the user opted in to the names of the conventions' main branch."""
    latest = _mode.latest
    if latest is None:
        latest = _mode.latest = _read(os.environ)
    return latest


def refresh() -> bool:
    """Read ``OTEL_SEMCONV_STABILITY_OPT_IN`` again; returns the new :func:`latest_experimental`."""
    _mode.latest = _read(os.environ)
    return _mode.latest


def retrieval_top_k() -> str:
    """The attribute key of a retrieval's result limit."""
    return RETRIEVAL_TOP_K_LATEST if latest_experimental() else RETRIEVAL_TOP_K_RELEASED
