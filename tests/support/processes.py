"""The environment of an application a test starts in a subprocess."""

from __future__ import annotations

import json
import os
from pathlib import Path

from crew_otel.testing.crews import OFFLINE_ENVIRONMENT

#: The checkout (tests/ imports as ``tests``).
ROOT = Path(__file__).resolve().parents[2]


def app_environment(
    home: Path | None = None, *, checkout_on_path: bool = True, **extra: str
) -> dict[str, str]:
    """This process's environment with CrewAI offline, ``HOME`` (and the XDG data directory)
    in ``home``, the checkout first on ``PYTHONPATH``, then ``extra``. Not strict: the
    application logs crew_otel's internal errors as it would in production."""
    env = {**os.environ, **OFFLINE_ENVIRONMENT}
    if home is not None:
        env.update(HOME=str(home), XDG_DATA_HOME=str(Path(home) / "xdg"))
    if checkout_on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    env.pop("CREW_OTEL_STRICT", None)
    return env


def console_spans(stdout: str) -> list[dict]:
    """The JSON span objects the console exporter printed (other output is skipped)."""
    decoder = json.JSONDecoder()
    spans, index = [], 0
    while (start := stdout.find("{", index)) != -1:
        try:
            value, end = decoder.raw_decode(stdout, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        if isinstance(value, dict) and "context" in value and "name" in value:
            spans.append(value)
        index = end
    return spans
