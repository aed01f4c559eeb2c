"""Helpers shared by the test modules: an OTLP receiver, waiting on facts, subprocess
environments, metric points. Test modules import from here, never from each other."""
