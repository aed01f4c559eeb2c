"""The loopback provider in its own process, for load tests.

In the test's process, the provider's accept loop and handler threads compete for the GIL with
hundreds of CrewAI threads: on a busy 2-core machine connections then wait seconds to be
accepted and time out before they reach it, which is the test machine's story and not the
instrumentation's. In a child process it answers like a remote provider does.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from typing import Any

from crew_otel.testing import FakeOpenAIProvider

_START_TIMEOUT = 60.0


def _serve(conn: Connection, options: dict[str, Any]) -> None:
    with FakeOpenAIProvider(**options) as provider:
        conn.send(provider.port)
        while conn.recv() == "count":
            conn.send(len(provider.requests))


class ProviderProcess:
    """``FakeOpenAIProvider(**options)`` served from a spawned child process."""

    def __init__(self, **options: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_conn, options), name="fake-openai-provider", daemon=True
        )
        self._child_conn = child_conn
        self._port = 0

    def __enter__(self) -> ProviderProcess:
        self._process.start()
        self._child_conn.close()
        if not self._conn.poll(_START_TIMEOUT):
            self._process.kill()
            raise AssertionError("the provider process did not start")
        self._port = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
        except OSError:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def request_count(self) -> int:
        """How many chat requests the provider has seen."""
        self._conn.send("count")
        return int(self._conn.recv())
