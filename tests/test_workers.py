"""Several worker processes: ``uvicorn --workers 2`` and ``gunicorn --preload -w 2``.

Each server runs tests/worker_app.py (``crew_otel.configure()`` at import, OTLP to a receiver
in this test). Every request's trace arrives complete, each worker reports under its own
``service.instance.id``, and ``crew_otel.kickoffs.active`` summed over the workers is the
number of kickoffs really in flight during a burst (parked at a gate of the loopback provider
until the test has seen it), then 0.
Under uvicorn each worker also exposes ``/metrics`` the way the README's Prometheus snippet
does, and both endpoints are scraped during the burst.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from crew_otel import attributes as a
from crew_otel.metrics import KICKOFFS_ACTIVE
from crew_otel.testing import FakeOpenAIProvider, Fault
from crew_otel.testing.crews import make_llm, research_crew
from tests.support.otlp import OtlpReceiver, string_attribute
from tests.support.processes import app_environment
from tests.support.waiting import free_port, wait_for

HERE = Path(__file__).resolve().parent
BURST = 4
#: A bound against a broken test (a run that never arrives), not a measurement.
WAIT_S = 120.0
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def free_port_pair() -> int:
    """A port P with P + 1 free too (the second worker's /metrics)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


class Server:
    def __init__(self, kind: str, command: list[str], env: dict[str, str], port: int) -> None:
        self.kind = kind
        self.receiver = OtlpReceiver()
        self.port = port
        self.metrics_port = int(env.get("METRICS_PORT", 0))
        env = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": self.receiver.endpoint}
        self.log = open(os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, env=env, cwd=HERE.parent, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.log.close()
        self.receiver.close()


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeOpenAIProvider]:
    with FakeOpenAIProvider() as server:
        yield server


@pytest.fixture(scope="module")
def servers(
    provider: FakeOpenAIProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """Both servers, started together so their start-ups (importing CrewAI) overlap."""
    env = app_environment(
        tmp_path_factory.mktemp("workers-home"),
        PROVIDER_URL=provider.base_url,
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_METRIC_EXPORT_INTERVAL="250",
    )
    app = "tests.worker_app:app"
    uvicorn_port, gunicorn_port = free_port(), free_port()
    started = {
        "uvicorn": Server(
            "uvicorn",
            [sys.executable, "-m", "uvicorn", app, "--workers", "2", "--host", "127.0.0.1",
             "--port", str(uvicorn_port), "--log-level", "warning", *UVICORN_HEALTHCHECK],
            {**env, "METRICS_PORT": str(free_port_pair())},
            uvicorn_port,
        ),
        "gunicorn": Server(
            "gunicorn",
            [sys.executable, "-m", "gunicorn", "--preload", "-w", "2",
             "-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{gunicorn_port}",
             "--graceful-timeout", "3", "--log-level", "warning", app],
            env,
            gunicorn_port,
        ),
    }  # fmt: skip
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def _uvicorn_healthcheck() -> list[str]:
    """uvicorn's supervisor restarts a worker that does not answer its health check within 5 s,
    dropping the requests in flight: on a loaded 2-core machine, a worker importing CrewAI for
    its first request can take longer. Give it a minute (uvicorn >= 0.30 has the option)."""
    import inspect

    import uvicorn

    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        return ["--timeout-worker-healthcheck", "60"]
    return []


UVICORN_HEALTHCHECK = _uvicorn_healthcheck()


def post(client: httpx.Client, server: Server, topic: str, request_id: str) -> dict[str, Any]:
    response = client.post(
        f"{server.url}/run/{topic}", headers={"X-Request-ID": request_id}, timeout=120
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    assert f"[[{topic}]]" in body["raw"]
    return body


def new_client() -> httpx.Client:
    # a new connection per request, so the kernel spreads requests over the workers
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def wait_until_up(server: Server, timeout: float = 240) -> None:
    def answers() -> bool:
        assert server.process.poll() is None, f"{server.kind} exited ({server.process.returncode})"
        try:
            return httpx.get(f"{server.url}/docs", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout, f"{server.kind} to answer")


def warm_up(server: Server) -> dict[str, dict[str, Any]]:
    """Requests until both workers answered; by request ID, what each answer said."""
    answers: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 180
    with new_client() as client, ThreadPoolExecutor(max_workers=BURST) as pool:
        while len({body["pid"] for body in answers.values()}) < 2:
            assert time.monotonic() < deadline, f"one worker never answered: {answers}"
            ids = [f"{server.kind}-warm-{len(answers) + i}" for i in range(BURST)]
            for request_id, body in zip(
                ids, pool.map(lambda rid: post(client, server, rid, rid), ids)
            ):
                answers[request_id] = body
    return answers


def active_samples(receiver: OtlpReceiver) -> list[tuple[str, float, float]]:
    """(service.instance.id, time in s, kickoffs in flight) of every export of the gauge."""
    _, requests = receiver.snapshot()
    samples = []
    for request in requests:
        for resource_metrics in request.resource_metrics:
            instance = string_attribute(resource_metrics.resource, "service.instance.id")
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != KICKOFFS_ACTIVE:
                        continue
                    points = metric.sum.data_points
                    if points:
                        value = sum(p.as_int or p.as_double for p in points)
                        samples.append((str(instance), points[0].time_unix_nano / 1e9, value))
    return samples


def in_flight_at(samples: list[tuple[str, float, float]], when: float) -> dict[str, float]:
    """Each instance's latest exported value at ``when``."""
    latest: dict[str, tuple[float, float]] = {}
    for instance, at, value in samples:
        if at <= when and at >= latest.get(instance, (0.0, 0.0))[0]:
            latest[instance] = (at, value)
    return {instance: value for instance, (_, value) in latest.items()}


def exported_since(samples: list[tuple[str, float, float]], since: float) -> dict[str, set[float]]:
    """The values each instance exported after ``since``."""
    values: dict[str, set[float]] = collections.defaultdict(set)
    for instance, at, value in samples:
        if at > since:
            values[instance].add(value)
    return dict(values)


def scrape_active(port: int) -> tuple[str, float]:
    """(service_instance_id, crew_otel_kickoffs_active summed) from one /metrics endpoint."""
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    instance, active = "", 0.0
    for line in body.splitlines():
        if line.startswith("target_info{"):
            instance = line.split('service_instance_id="')[1].split('"')[0]
        elif line.startswith("crew_otel_kickoffs_active"):
            active += float(line.rsplit(" ", 1)[1])
    return instance, active


def spans_by_request(receiver: OtlpReceiver) -> dict[str, list[tuple[str, Any]]]:
    """(service.instance.id, span) per request ID, from every trace export."""
    requests, _ = receiver.snapshot()
    found: dict[str, list[tuple[str, Any]]] = collections.defaultdict(list)
    for request in requests:
        for resource_spans in request.resource_spans:
            instance = str(string_attribute(resource_spans.resource, "service.instance.id"))
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found[str(string_attribute(span, a.REQUEST_ID))].append((instance, span))
    return found


def reference_names(base_url: str) -> collections.Counter[str]:
    """The span names of one run of the same crew, in this process."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import crew_otel

    memory = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
    crew_otel.uninstrument()
    crew_otel.instrument(tracer_provider=tracer_provider)
    try:
        research_crew(lambda: make_llm(base_url)).kickoff(inputs={"topic": "[[reference]]"})
    finally:
        crew_otel.uninstrument()
    return collections.Counter(s.name for s in memory.get_finished_spans())


@pytest.mark.slow
@needs_fork
@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn"])
def test_two_workers_report_complete_traces_and_their_own_in_flight_counts(
    kind: str, servers: dict[str, Server], provider: FakeOpenAIProvider
) -> None:
    server = servers[kind]
    expected_names = reference_names(provider.base_url)
    wait_until_up(server)
    answers = warm_up(server)
    workers = {body["pid"]: body["instance"] for body in answers.values()}
    assert len(workers) == 2
    assert len(set(workers.values())) == 2
    assert None not in workers.values()

    # --- the burst: BURST kickoffs parked in their model calls at once --------------------------
    topics = [f"{kind}-burst-{i}" for i in range(BURST)]
    gate = provider.gate(f"{kind}-burst")
    for topic in topics:
        provider.script(Fault.hold(gate.name, seconds=WAIT_S), key=topic)
    scraped: list[tuple[str, float]] = []

    def burst_request(topic: str) -> dict[str, Any]:
        with new_client() as client:
            return post(client, server, topic, topic)

    with ThreadPoolExecutor(max_workers=BURST) as pool:
        results = pool.map(burst_request, topics)
        try:
            gate.wait_parked(BURST, WAIT_S)  # every burst run is in flight, held there
            all_held_at = time.time()

            # every export from now on reports what is in flight while the runs are held: the
            # workers' latest values sum to the burst, and no export says otherwise
            def held_burst_exported() -> dict[str, set[float]]:
                fresh = exported_since(active_samples(server.receiver), all_held_at)
                latest = in_flight_at(active_samples(server.receiver), time.time())
                return fresh if sum(latest[i] for i in fresh) == BURST else {}

            fresh = server.receiver.wait_until(
                held_burst_exported, f"the workers' gauges to export the {BURST} held runs"
            )
            if server.metrics_port:
                scraped = [scrape_active(server.metrics_port + i) for i in range(2)]
            fresh = exported_since(active_samples(server.receiver), all_held_at)
        finally:
            gate.open()
        answers.update(zip(topics, results))
    assert set(fresh) <= set(workers.values()), fresh
    assert all(len(values) == 1 for values in fresh.values()), f"the gauge moved: {fresh}"
    assert sum(value for (value,) in fresh.values()) == BURST, fresh
    if scraped:
        assert {instance for instance, _ in scraped} == set(workers.values()), scraped
        assert sum(active for _, active in scraped) == BURST, scraped

    # --- kickoffs in flight, per instance, back to 0 ------------------------------------------
    # The gauge reports a workflow while it has runs in flight and once more when it drops
    # to 0; an instance without a sample is at 0.
    def back_to_zero() -> bool:
        latest = in_flight_at(active_samples(server.receiver), time.time())
        return set(latest) == set(workers.values()) and not any(latest.values())

    server.receiver.wait_until(
        back_to_zero, "every worker to export 0 kickoffs in flight after the burst"
    )

    # --- every request's trace, complete, from the worker that answered it ---------------------
    def all_traces_arrived() -> bool:
        found = spans_by_request(server.receiver)
        if not all(len(found.get(rid, [])) >= sum(expected_names.values()) for rid in answers):
            return False
        traces = spans_by_trace(server.receiver)
        return all(complete(traces[span.trace_id]) for rid in answers for _, span in found[rid])

    server.receiver.wait_until(all_traces_arrived, "every request's whole trace")
    found = spans_by_request(server.receiver)
    traces = spans_by_trace(server.receiver)
    for request_id, body in answers.items():
        spans = [span for _, span in found[request_id]]
        assert collections.Counter(s.name for s in spans) == expected_names, request_id
        (trace_id,) = {s.trace_id for s in spans}
        whole = traces[trace_id]
        assert {instance for instance, _ in whole} == {body["instance"]}
        ids = {s.span_id for _, s in whole}
        assert len([s for _, s in whole if not s.parent_span_id]) == 1, request_id
        assert all(s.parent_span_id in ids for _, s in whole if s.parent_span_id), request_id


def spans_by_trace(receiver: OtlpReceiver) -> dict[bytes, list[tuple[str, Any]]]:
    """(service.instance.id, span) per trace ID."""
    found: dict[bytes, list[tuple[str, Any]]] = collections.defaultdict(list)
    for spans in spans_by_request(receiver).values():
        for instance, span in spans:
            found[span.trace_id].append((instance, span))
    return found


def complete(trace: list[tuple[str, Any]]) -> bool:
    """One root, and every span's parent present."""
    ids = {span.span_id for _, span in trace}
    roots = [span for _, span in trace if not span.parent_span_id]
    return len(roots) == 1 and all(
        span.parent_span_id in ids for _, span in trace if span.parent_span_id
    )


# --- service.instance.id after a fork, without a server -----------------------------------------
FORK_JOB = """
import os, sys
import crew_otel
from opentelemetry import metrics, trace

setup = crew_otel.configure(service_name="forked", endpoint=sys.argv[1], instrument=False)
tracer = trace.get_tracer("job")
runs = metrics.get_meter("job").create_counter("job.runs")
with tracer.start_as_current_span("parent"):
    runs.add(1)
pid = os.fork()
if pid == 0:
    with tracer.start_as_current_span("child"):
        runs.add(1)
    setup.shutdown()
    os._exit(0)
os.waitpid(pid, 0)
setup.shutdown()
"""


@needs_fork
def test_configure_gives_each_forked_process_its_own_instance_id(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    try:
        script = tmp_path / "fork_job.py"
        script.write_text(FORK_JOB)
        env = app_environment(OTEL_METRICS_EXPORTER="otlp")
        env.pop("OTEL_RESOURCE_ATTRIBUTES", None)
        done = subprocess.run(
            [sys.executable, str(script), receiver.endpoint],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        by_name: dict[str, set[str | None]] = collections.defaultdict(set)
        for request in receiver.traces:
            for resource_spans in request.resource_spans:
                instance = string_attribute(resource_spans.resource, "service.instance.id")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        by_name[span.name].add(instance)
        metric_instances = {
            string_attribute(rm.resource, "service.instance.id")
            for request in receiver.metrics
            for rm in request.resource_metrics
        }
        (parent,) = by_name["parent"]
        (child,) = by_name["child"]
        assert parent
        assert child
        assert parent != child
        assert metric_instances == {parent, child}
    finally:
        receiver.close()
