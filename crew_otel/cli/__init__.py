"""The ``crew-otel`` command line: ``doctor`` (and the subcommands registered in main.py)."""
