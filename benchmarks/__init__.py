"""Benchmarks of crew_otel's overhead: ``python -m benchmarks.run`` (see README.md)."""
