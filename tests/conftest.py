"""Test setup: CrewAI offline and sandboxed, loopback-only network, strict instrumentation.

The environment is prepared before anything imports crewai. A socket guard refuses every
connection and DNS lookup that is not loopback, so a test cannot reach the internet even by
accident. Strict mode makes an internal crew_otel error fail the test instead of being logged.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from crew_otel.testing.crews import prepare_offline_environment

_home = prepare_offline_environment()

import pytest  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

import crew_otel  # noqa: E402
from crew_otel.safety import reset_reported_errors, set_strict  # noqa: E402

# --- loopback-only network -----------------------------------------------------------------
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo
blocked: list[str] = []


def _is_loopback(host: Any) -> bool:
    if host is None or host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _guard_address(address: Any) -> None:
    if isinstance(address, tuple) and address and not _is_loopback(address[0]):
        blocked.append(str(address[0]))
        raise ConnectionRefusedError(f"tests may only connect to loopback, not {address[0]}")


def _connect(self: socket.socket, address: Any) -> None:
    _guard_address(address)
    _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _guard_address(address)
    return _real_connect_ex(self, address)


def _getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    if not _is_loopback(name):
        blocked.append(str(name))
        raise socket.gaierror(socket.EAI_NONAME, f"tests may not resolve {name}")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _connect  # type: ignore[method-assign]
socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = _getaddrinfo

set_strict(True)
# CrewAI warns on every call that it estimates tokens for a non-OpenAI base URL.
logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)

import crewai  # noqa: E402,F401  - imported once, after the environment is prepared


# --- no CA bundle --------------------------------------------------------------------------
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Trust an empty CA directory, unless a collected test reaches the package registries.

    Every OpenAI, Chroma and httpx client that CrewAI builds (several per kickoff) loads the CA
    bundle, about 0.14 CPU-seconds each: a quarter of a crew test's CPU. The tests talk plain
    HTTP to loopback, so the test process and the applications it starts need no CAs. A module
    that installs from the registries sets ``USES_PACKAGE_REGISTRIES = True``; a session that
    collects one keeps the real CA settings throughout.
    """
    modules = {item.module for item in items if isinstance(item, pytest.Function)}
    if any(getattr(module, "USES_PACKAGE_REGISTRIES", False) for module in modules):
        return
    empty = os.path.join(_home, "no-ca")
    os.makedirs(empty, exist_ok=True)
    os.environ.pop("SSL_CERT_FILE", None)
    os.environ["SSL_CERT_DIR"] = empty


@pytest.fixture(autouse=True)
def _no_outbound_connections() -> Iterator[None]:
    before = len(blocked)
    yield
    assert blocked[before:] == [], f"a test tried to reach {blocked[before:]}"


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    """An in-memory metric reader on a fresh MeterProvider (instruments are per provider)."""
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(metric_reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[metric_reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def otel(
    otel_tracer_provider: TracerProvider,
    span_exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
) -> Iterator[InMemorySpanExporter]:
    """CrewAI instrumented with the session tracer provider and a fresh meter provider."""
    crew_otel.uninstrument()
    reset_reported_errors()
    crew_otel.instrument(tracer_provider=otel_tracer_provider, meter_provider=meter_provider)
    try:
        yield span_exporter
    finally:
        crew_otel.uninstrument()
