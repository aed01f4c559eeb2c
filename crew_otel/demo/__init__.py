"""``crew-otel demo``: reproduce intermittent 500s under concurrency on this machine, offline."""
