"""The demo: a faulty provider, the example services, the article's load pattern, a report.

1. Start the fault-injecting OpenAI-compatible provider on 127.0.0.1 (seeded random 500s,
   429s, timeouts and latency).
2. Serve the broken, the half-fixed and the fixed example app, each in its own process with
   uvicorn, each exporting its spans as OTLP/JSON lines.
3. Drive each with the debugging procedure of the article: requests one at a time, then bursts
   of ``--concurrency`` in parallel. Each request's ticket is a ``[[marker]]`` the provider
   echoes (``[[halffixed-10003]]``: five digits, so crew_otel's cross-talk detection takes it
   for an identifier), so an answer that carries another request's ticket (silent cross-talk)
   is counted.
4. Stop the services (which flushes their spans), merge the span files and print the report
   (the same analysis as ``crew-otel report FILE``), plus a consistency check against what the
   provider and the clients saw: the answers crew_otel flagged as carrying another request's
   data must be as many as those the demo found carrying another request's ticket, and the
   report's failed runs by cause (from ``crew_otel.failure.cause`` on the spans) must be what
   each service's ``crew_otel.failures`` counter counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console

from crew_otel.demo.options import DemoOptions, ServeOptions
from crew_otel.demo.services import SERVICES, failures_file, service_name
from crew_otel.otlp_json import OtlpJsonError, read_file
from crew_otel.report.analysis import Crosstalk, ServiceReport, analyse, summary
from crew_otel.report.render import print_reports, save_timeline_svg
from crew_otel.testing.ports import free_port
from crew_otel.testing.provider import MARKER, FakeOpenAIProvider, RandomFaults

STARTUP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 60.0
#: Request ``i`` of a service carries ticket number ``TICKET_BASE + i`` (five digits: a mark).
TICKET_BASE = 10_000


class DemoError(RuntimeError):
    """The demo itself broke (not the services under test)."""


@dataclasses.dataclass
class ClientResult:
    service: str
    index: int
    phase: str
    status: int | None
    error: str | None
    seconds: float
    foreign_ticket: bool = False
    """The answer carries another request's ticket (cross-talk between requests)."""
    request_id: str = ""
    """The ``X-Request-ID`` sent (the services that read it make it the request ID)."""
    foreign_tickets: list[str] = dataclasses.field(default_factory=list)
    """The other requests' tickets in the answer (``halffixed-10007``)."""
    sent_at: float = 0.0
    answered_at: float = 0.0
    """When the request was sent and its answer (or error) came, in seconds since the
    service's first request."""

    def overlaps(self, other: ClientResult) -> bool:
        """Whether the two requests were in flight at the same time (as the client saw it)."""
        return self.sent_at < other.answered_at and other.sent_at < self.answered_at


def ticket(service: str, index: int) -> str:
    """Request ``index``'s ticket: ``[[halffixed-10003]]``."""
    return f"[[{service}-{TICKET_BASE + index}]]"


def request_id(service: str, index: int) -> str:
    """Request ``index``'s ``X-Request-ID``: ``h-10003`` (the number of its ticket)."""
    return f"{service[0]}-{TICKET_BASE + index}"


#: How many ports a service tries before the demo gives up (another process took the port).
PORT_ATTEMPTS = 5


def _free_port() -> int:
    return free_port()


class ServiceProcess:
    """One example service served by ``python -m crew_otel.demo.serve``."""

    def __init__(self, service: str, provider_url: str, workdir: Path, otlp: str | None) -> None:
        self.service = service
        self.trace_file = workdir / f"{service}.jsonl"
        self.log_file = workdir / f"{service}.log"
        self._provider_url = provider_url
        self._otlp = otlp
        self._log = self.log_file.open("w")
        self._port_attempts = 0
        self._start()

    def _start(self) -> None:
        # The port is free when chosen; another process may take it before the service binds
        # it (wait_ready then starts the service again on another port).
        self._port_attempts += 1
        self.port = _free_port()
        options = ServeOptions(
            self.service, self.port, self._provider_url, self.trace_file, self._otlp
        )
        command = [sys.executable, "-m", "crew_otel.demo.serve", *options.argv()]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, deadline: float) -> None:
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    tail = self.tail()
                    if "address already in use" in tail and self._port_attempts < PORT_ATTEMPTS:
                        self._start()
                        continue
                    raise DemoError(f"{self.service} service exited: {tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                time.sleep(0.2)
        raise DemoError(f"{self.service} service did not start in {STARTUP_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def tail(self) -> str:
        lines = self.log_file.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"


def _drive(service: str, url: str, options: DemoOptions) -> list[ClientResult]:
    """One at a time first, then bursts of ``concurrency`` (the article's procedure)."""
    sequential = max(1, min(4, options.requests // 5))
    results: list[ClientResult] = []

    first = time.perf_counter()

    def send(client: httpx.Client, index: int, phase: str) -> ClientResult:
        own, rid = ticket(service, index), request_id(service, index)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        foreign: list[str] = []
        try:
            response = client.post(
                f"{url}/tickets", json={"ticket": own}, headers={"X-Request-ID": rid}
            )
            status = response.status_code
            foreign = _foreign_tickets(response, own) if status == 200 else []
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        ended = time.perf_counter()
        return ClientResult(
            service,
            index,
            phase,
            status,
            error,
            ended - started,
            bool(foreign),
            rid,
            foreign,
            started - first,
            ended - first,
        )

    limits = httpx.Limits(max_connections=options.concurrency + 2)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        for index in range(sequential):
            results.append(send(client, index, "sequential"))
        index = sequential
        with ThreadPoolExecutor(max_workers=options.concurrency) as pool:
            while index < options.requests:
                burst = range(index, min(index + options.concurrency, options.requests))
                results.extend(pool.map(lambda i: send(client, i, "parallel"), burst))
                index = burst.stop
    return results


def _foreign_tickets(response: httpx.Response, ticket: str) -> list[str]:
    """The tickets other than the request's own that the answer names."""
    try:
        answer = str(response.json().get("result", ""))
    except (ValueError, AttributeError):
        return []
    own = ticket.strip("[]")
    found = dict.fromkeys(MARKER.findall(answer))
    return [marker for marker in found if marker not in (own, "none")]


def _tickets_by_when(
    result: ClientResult, results: dict[str, ClientResult]
) -> tuple[list[str], list[str]]:
    """The foreign tickets in ``result``'s answer: (those of requests in flight at the same
    time as the client saw it, those of requests answered before it was sent). ``results`` is
    by ticket; a ticket the demo did not send counts as in flight."""
    in_flight: list[str] = []
    earlier: list[str] = []
    for foreign in result.foreign_tickets:
        other = results.get(foreign)
        (in_flight if other is None or other.overlaps(result) else earlier).append(foreign)
    return in_flight, earlier


def run(options: DemoOptions, console: Console) -> int:
    """Run the demo; 0 when it ran (whatever the services did), 1 when the demo itself broke."""
    workdir = Path(tempfile.mkdtemp(prefix="crew-otel-demo-"))
    faults = RandomFaults(
        error_rate=options.error_rate,
        rate_limit_rate=options.rate_limit_rate,
        timeout_rate=options.timeout_rate,
        latency=options.latency,
        timeout_seconds=3.0,
        seed=options.seed,
    )
    try:
        with FakeOpenAIProvider(random_faults=faults) as provider:
            console.print(
                f"[bold]crew-otel demo[/bold]: provider on {provider.base_url} "
                f"(500s {options.error_rate:.0%}, 429s {options.rate_limit_rate:.0%}, "
                f"timeouts {options.timeout_rate:.0%}, seed {options.seed}); "
                f"{options.requests} requests per service, bursts of {options.concurrency}",
                highlight=False,
            )
            processes = [
                ServiceProcess(s, provider.base_url, workdir, options.otlp_endpoint)
                for s in SERVICES
            ]
            try:
                deadline = time.monotonic() + STARTUP_TIMEOUT_S
                for process in processes:
                    process.wait_ready(deadline)
                client_results: list[ClientResult] = []
                for process in processes:
                    with console.status(f"driving the {process.service} service..."):
                        client_results += _drive(process.service, process.url, options)
            finally:
                for process in processes:
                    process.stop()
            provider_requests = provider.stats()["requests"]
        return _report(options, console, processes, client_results, provider_requests)
    except DemoError as exc:
        Console(stderr=True, soft_wrap=True).print(
            f"crew-otel demo: error: {exc}", highlight=False, markup=False
        )
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _report(
    options: DemoOptions,
    console: Console,
    processes: list[ServiceProcess],
    client_results: list[ClientResult],
    provider_requests: int,
) -> int:
    lines: list[str] = []
    for process in processes:
        if process.trace_file.exists():
            lines += process.trace_file.read_text().splitlines()
    merged = process.trace_file.parent / "merged.jsonl"
    merged.write_text("\n".join(lines) + "\n")
    try:
        spans = read_file(merged)
    except OtlpJsonError as exc:
        raise DemoError(f"no readable spans from the services ({exc})") from None
    if options.out is not None:
        options.out.write_text(merged.read_text())
    order = {service_name(service): i for i, service in enumerate(SERVICES)}
    reports = sorted(analyse(spans), key=lambda r: order.get(r.service, len(order)))
    print_reports(reports, console)
    if options.svg is not None:
        save_timeline_svg(reports, options.svg)
        console.print(f"timeline saved to {options.svg}", highlight=False)

    traced_attempts = sum(r.http_attempts for r in reports)
    client_status = Counter(str(r.status or r.error) for r in client_results)
    traced_requests = sum(len(r.requests) for r in reports)
    console.print(
        f"Provider saw {provider_requests} requests; traces show {traced_attempts} HTTP "
        f"attempts to it. Clients sent {len(client_results)} requests "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(client_status.items()))}); "
        f"traces show {traced_requests}.",
        highlight=False,
    )
    mismatch = _print_crosstalk(console, reports, client_results)
    causes_mismatch = _print_failure_causes(console, reports, processes)
    if options.summary_json is not None:
        figures = summary(reports)
        figures.update(
            provider_requests=provider_requests,
            client_requests=len(client_results),
            client_results=[dataclasses.asdict(r) for r in client_results],
        )
        options.summary_json.write_text(json.dumps(figures, indent=2))
    problems = []
    if traced_attempts != provider_requests:
        problems.append("HTTP attempts in the traces do not match the provider's count")
    if traced_requests != len(client_results):
        problems.append("requests in the traces do not match the requests sent")
    if any(r.status is None for r in client_results):
        problems.append("some requests got no HTTP response at all")
    if mismatch:
        problems.append(
            "answers carrying another request's data: crew_otel and the demo disagree ("
            + ", ".join(mismatch)
            + ")"
        )
    if causes_mismatch:
        problems.append(
            "failed runs by cause: the report and the crew_otel.failures metric disagree ("
            + "; ".join(causes_mismatch)
            + ")"
        )
    if problems:
        raise DemoError("; ".join(problems))
    return 0


def _metric_failures(process: ServiceProcess) -> dict[str, int] | None:
    """What the service's ``crew_otel.failures`` counter counted, by cause (None: the service
    wrote nothing, e.g. it was killed)."""
    try:
        data = json.loads(failures_file(process.trace_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and v}


def _print_failure_causes(
    console: Console, reports: list[ServiceReport], processes: list[ServiceProcess]
) -> list[str]:
    """Print, per service, the failed runs by cause as the ``crew_otel.failures`` metric counted
    them inside the service; return the services where the report (from the spans'
    ``crew_otel.failure.cause``) says otherwise."""
    by_service = {r.service: {c.cause: c.runs for c in r.failure_causes} for r in reports}
    seen: list[str] = []
    mismatch: list[str] = []
    for process in processes:
        metric = _metric_failures(process)
        if metric is None:
            continue
        spans = by_service.get(service_name(process.service), {})
        ordered = sorted(metric.items(), key=lambda cn: (-cn[1], cn[0]))  # as the report
        counted = ", ".join(f"{c} {n}" for c, n in ordered)
        seen.append(f"{process.service} {counted or 'none'}")
        if spans != metric:
            mismatch.append(f"{process.service}: report {spans}, metric {metric}")
    if seen:
        console.print(
            "Failed runs by cause, counted by the services' crew_otel.failures metric: "
            + "; ".join(seen)
            + ".",
            highlight=False,
        )
    return mismatch


def _print_crosstalk(
    console: Console, reports: list[ServiceReport], client_results: list[ClientResult]
) -> list[str]:
    """Print, per service, the successful answers carrying another request's ticket (what the
    demo saw) and those crew_otel flagged as carrying another in-flight request's data; return
    the services where the two disagree (``halffixed: demo 7, crew_otel 6``).

    crew_otel flags only data of runs in flight at the same time. When no answer of a service
    carries the ticket of a request answered before it was sent, the demo's count of answers
    carrying another request's ticket must equal crew_otel's. When some do (stale state: a
    shared Agent remembering earlier runs), the client cannot tell which runs overlapped in
    the service (a run may wait there for a worker thread), so crew_otel's count must only not
    exceed the answers carrying the ticket of a request in flight at the same time as the
    client saw it."""
    by_service = {r.service: r.crosstalk for r in reports}
    services = list(dict.fromkeys(r.service for r in client_results))
    by_ticket = {ticket(r.service, r.index).strip("[]"): r for r in client_results}
    answered = Counter(r.service for r in client_results if r.status == 200)
    foreign: Counter[str] = Counter()
    in_flight: Counter[str] = Counter()  # with the ticket of a request in flight at the time
    stale: Counter[str] = Counter()  # with the ticket of a request answered before it was sent
    stale_only: Counter[str] = Counter()  # with no other
    for result in (r for r in client_results if r.foreign_ticket):
        current, earlier = _tickets_by_when(result, by_ticket)
        foreign[result.service] += 1
        in_flight[result.service] += bool(current)
        stale[result.service] += bool(earlier)
        stale_only[result.service] += not current
    flagged = {s: by_service.get(service_name(s), Crosstalk()) for s in services}

    def seen(service: str) -> str:
        text = f"{service} {foreign[service]} of {answered[service]}"
        if stale[service]:
            text += (
                f" ({stale[service]} with the ticket of a request answered before it was sent, "
                f"{stale_only[service]} with no other)"
            )
        return text

    console.print(
        "Successful answers carrying another request's ticket (silent cross-talk), seen by the "
        f"demo: {', '.join(seen(s) for s in services)}; answers carrying another in-flight "
        "request's data, flagged by crew_otel: "
        + ", ".join(f"{s} {flagged[s].carrying} of {flagged[s].answers}" for s in services)
        + ".",
        highlight=False,
    )

    def disagree(service: str) -> bool:
        carrying = flagged[service].carrying
        if stale[service]:  # which runs overlapped in the service: the client cannot tell
            return carrying > in_flight[service]
        return carrying != foreign[service]

    return [
        f"{s}: demo {foreign[s]}, crew_otel {flagged[s].carrying}" for s in services if disagree(s)
    ]
