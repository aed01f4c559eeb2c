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

# --- the version matrix ----------------------------------------------------------------------
#: Test modules whose outcome depends on the CrewAI or OpenTelemetry version: the hooks into
#: CrewAI's internals and what they record. The lowest supported versions and openai 3 run these
#: (``--versions=crewai``); the rest (reports, assets, the CLI, worker processes, packaging, ...)
#: runs once, on the latest.
CREWAI_SENSITIVE = frozenset(
    {
        "test_async_and_logs",
        "test_cancellation",
        "test_chat_response",
        "test_compat",
        "test_conventions",
        "test_crosstalk",
        "test_errors",
        "test_failure_cause",
        "test_flow_steps",
        "test_garbage",
        "test_guardrails",
        "test_http_headers",
        "test_instrumentor",
        "test_internals",
        "test_knowledge_errors",
        "test_load",
        "test_mcp_errors",
        "test_mcp_names",
        "test_memory_spans",
        "test_one_fatal_origin",
        "test_origins",
        "test_plan",
        "test_planning",
        "test_provider_endpoints",
        "test_request_scope",
        "test_runs",
        "test_shared_state",
        "test_shared_state_corpus",
        "test_sharing",
        "test_spans",
        "test_sqlite_freeze",
        "test_storage_contention",
        "test_streams",
        "test_suppression",
        "test_thread_run_end",
        "test_threads",
        "test_uninstrument_race",
        "test_waits",
    }
)
#: Test modules whose outcome depends on the Python version (bytecode and AST analysis, thread
#: and context propagation): the other interpreters the package claims run these
#: (``--versions=python``).
PYTHON_SENSITIVE = frozenset(
    {
        "test_async_and_logs",
        "test_context_switch",
        "test_internals",
        "test_mutations",
        "test_request_scope",
        "test_suppression",
        "test_thread_run_end",
        "test_threads",
    }
)
#: Prefixes of further Python-sensitive modules (the CrewAI-free bytecode-analysis corpus; the
#: corpus through CrewAI runs on the latest and the lowest CrewAI).
PYTHON_PREFIXES = ("test_shared_state_corpus_analysis",)
MATRIX = {"crewai": CREWAI_SENSITIVE, "python": PYTHON_SENSITIVE}
#: Modules that take longest (a slow test, a demo run, a live Prometheus): run first, so that
#: pytest-xdist's other workers fill the time beside them instead of waiting for them at the end.
LONG_MODULES = frozenset(
    {"test_sqlite_freeze", "test_cli", "test_prometheus_live", "test_shared_state_corpus"}
)


def _module_name(path: Any) -> str:
    return os.path.basename(str(path)).removesuffix(".py")


def _sensitive_to(path: Any) -> set[str]:
    """Which versions (``crewai``, ``python``) the test module at ``path`` is sensitive to."""
    name = _module_name(path)
    found = {versions for versions, modules in MATRIX.items() if name in modules}
    if name.startswith(PYTHON_PREFIXES):
        found.add("python")
    return found


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--versions",
        choices=sorted(MATRIX),
        default=None,
        help="collect only the test modules sensitive to the CrewAI/OpenTelemetry versions "
        "(crewai) or to the Python version (python); see tests/conftest.py",
    )


def pytest_ignore_collect(collection_path: Any, config: pytest.Config) -> bool | None:
    """With ``--versions``, the other test modules are not even imported (so the environments
    of the version matrix need only the ``test`` extra, not ``test-full``)."""
    versions = config.getoption("--versions")
    name = os.path.basename(str(collection_path))
    if versions is None or not (name.startswith("test_") and name.endswith(".py")):
        return None
    return versions not in _sensitive_to(collection_path)


# --- no CA bundle --------------------------------------------------------------------------
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _mark_the_matrix(config, items)
    _long_modules_first(items)
    _trust_no_ca_unless_registries(items)


def _long_modules_first(items: list[pytest.Item]) -> None:
    """The modules with a ``slow`` test, and :data:`LONG_MODULES`, first (a stable sort: the
    order within a module stays as written)."""
    long_modules = {item.path for item in items if item.get_closest_marker("slow")}
    long_modules |= {item.path for item in items if _module_name(item.path) in LONG_MODULES}
    items.sort(key=lambda item: item.path not in long_modules)


def _mark_the_matrix(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the version-sensitive tests (``-m crewai_sensitive``, ``-m python_sensitive``);
    leave out the ``load`` benchmark unless ``-m``
    names it (``make load``)."""
    selected, deselected = [], []
    asked_for_load = "load" in (config.getoption("markexpr") or "")
    for item in items:
        for versions in _sensitive_to(item.path):
            item.add_marker(f"{versions}_sensitive")
        if item.get_closest_marker("load") and not asked_for_load:
            deselected.append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def _trust_no_ca_unless_registries(items: list[pytest.Item]) -> None:
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
