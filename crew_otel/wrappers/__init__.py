"""The wrappers crew_otel installs around CrewAI's methods: one callable class per target
(:mod:`crew_otel.targets` lists them), built on :mod:`crew_otel.wrappers.base`."""
