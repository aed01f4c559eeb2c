"""Instrumented library requirements, in the shape BaseInstrumentor expects."""

from __future__ import annotations

_instruments = ("crewai >= 1.12",)

_supports_metrics = True
