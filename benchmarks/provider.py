"""The loopback model provider in a process of its own, so its CPU is never counted.

``python -m benchmarks.provider`` prints the base URL on its first line and serves until its
standard input closes. Zero latency, no faults: every kickoff of the workload gets the same
three answers (a tool call, then two final answers).
"""

from __future__ import annotations

import sys

from crew_otel.testing import FakeOpenAIProvider


def main() -> None:
    with FakeOpenAIProvider() as provider:
        print(provider.base_url, flush=True)
        sys.stdin.read()  # until the parent closes the pipe
        stats = provider.stats()
    print(f"provider served {stats.get('requests')} requests", file=sys.stderr)


if __name__ == "__main__":
    main()
