"""Alerting end to end: a real Prometheus and a real Alertmanager deliver the shipped alerts.

Two copies of the article's services run under steady load, each exposing crew_otel's metrics
on a Prometheus endpoint: the broken one (a shared Agent) against a provider that answers every
request with HTTP 500, the fixed one against a healthy provider. Debian's ``prometheus`` scrapes
both and evaluates collector/prometheus/alerts.yml (a copy with every window and ``for``
shortened); Debian's ``prometheus-alertmanager`` runs collector/alertmanager/alertmanager.yml
(a copy with short group timings and a webhook to this test added to its receivers). The
broken service's alert reaches the webhook with its labels and filled-in runbook; the fixed
service, under the same rules, raises nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from crew_otel.testing import FakeOpenAIProvider, RandomFaults
from tests.support.processes import app_environment
from tests.support.waiting import free_port, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RULES = ROOT / "collector" / "prometheus" / "alerts.yml"
ALERTMANAGER = ROOT / "collector" / "alertmanager" / "alertmanager.yml"
BROKEN, FIXED = "support-api-broken", "support-api-fixed"
STORM = "CrewOtelProvider5xxStorm"
pytestmark = pytest.mark.slow


_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def _scaled(match: re.Match[str], factor: float, minimum: int) -> str:
    seconds = int(match.group("n")) * _UNIT_S[match.group("unit")]
    return f"{match.group('pre')}{max(int(seconds * factor), minimum)}s"


def shortened_rules(text: str) -> str:
    """The rules with range windows and offsets 20x and ``for`` durations 60x shorter."""
    text = re.sub(
        r"(?P<pre>\[|offset )(?P<n>\d+)(?P<unit>[smh])\b",
        lambda m: _scaled(m, 1 / 20, 5),
        text,
    )
    return re.sub(
        r"(?P<pre>for: )(?P<n>\d+)(?P<unit>[smh])\b", lambda m: _scaled(m, 1 / 60, 2), text
    )


def test_the_rules_are_shortened_not_changed() -> None:
    text = RULES.read_text()
    short = shortened_rules(text)
    assert "[15s]" in short
    assert "for: 2s" in short
    assert "[5m]" not in short
    before, after = yaml.safe_load(text), yaml.safe_load(short)
    names = [[r.get("alert") or r.get("record") for r in g["rules"]] for g in before["groups"]]
    assert names == [
        [r.get("alert") or r.get("record") for r in g["rules"]] for g in after["groups"]
    ]


class Webhook:
    """Alertmanager's webhook receiver: keeps every notification."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with hook._lock:
                    hook.notifications.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def alerts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [alert for n in self.notifications for alert in n["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """The shipped config with short group timings and the webhook in every receiver."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER.read_text())
    config["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1h")
    for receiver in config["receivers"]:
        receiver.setdefault("webhook_configs", []).append(
            {"url": webhook_url, "send_resolved": False}
        )
    return config


def start_service(example: str, port: int, base_url: str, home: Path) -> subprocess.Popen[str]:
    env = app_environment(home, OPENAI_BASE_URL=base_url, OTEL_SERVICE_NAME=example)
    return subprocess.Popen(
        [sys.executable, str(HERE / "alerting_app.py"), example, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )


def wait_ready(service: subprocess.Popen[str]) -> None:
    assert service.stdout is not None
    for line in service.stdout:  # CrewAI prints to stdout too
        if line.strip() == "READY":
            threading.Thread(target=service.stdout.read, daemon=True).start()  # keep draining
            return
    raise AssertionError(f"the service failed (exit {service.wait()})")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert prometheus, "prometheus is not installed (Debian package 'prometheus')"
    assert alertmanager, "alertmanager is missing (Debian package 'prometheus-alertmanager')"
    work = tmp_path_factory.mktemp("alerting")
    failing = FakeOpenAIProvider(random_faults=RandomFaults(error_rate=1.0)).start()
    healthy = FakeOpenAIProvider().start()
    webhook = Webhook()
    ports = {name: free_port() for name in (BROKEN, FIXED, "prometheus", "alertmanager")}
    processes: list[subprocess.Popen[Any]] = [
        start_service("broken_service", ports[BROKEN], failing.base_url, work),
        start_service("fixed_service", ports[FIXED], healthy.base_url, work),
    ]
    (work / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(webhook.url)))
    (work / "alerts.yml").write_text(shortened_rules(RULES.read_text()))
    (work / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(work / "alerts.yml")],
                "alerting": {
                    "alertmanagers": [
                        {"static_configs": [{"targets": [f"127.0.0.1:{ports['alertmanager']}"]}]}
                    ]
                },
                "scrape_configs": [
                    {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{ports[job]}"]}]}
                    for job in (BROKEN, FIXED)
                ],
            }
        )
    )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes.append(
        subprocess.Popen(
            [
                alertmanager,
                f"--config.file={work / 'alertmanager.yml'}",
                f"--storage.path={work / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
                "--cluster.listen-address=",
            ],
            **quiet,
        )
    )
    try:
        for service in processes[:2]:
            wait_ready(service)
        processes.append(
            subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                ],
                **quiet,
            )
        )
        yield {
            "webhook": webhook,
            "prometheus": f"http://127.0.0.1:{ports['prometheus']}/api/v1",
            "alertmanager": f"http://127.0.0.1:{ports['alertmanager']}/api/v2",
        }
    finally:
        for process in reversed(processes):
            if process.stdin:
                process.stdin.close()
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        webhook.close()
        failing.stop()
        healthy.stop()


def prometheus_alerts(base: str) -> list[dict[str, Any]]:
    try:
        return list(httpx.get(f"{base}/alerts", timeout=5).json()["data"]["alerts"])
    except httpx.HTTPError:
        return []


def test_a_failing_service_pages_and_a_healthy_one_stays_silent(stack: dict[str, Any]) -> None:
    webhook: Webhook = stack["webhook"]

    def delivered() -> list[dict[str, Any]]:
        return [a for a in webhook.alerts() if a["labels"]["alertname"] == STORM]

    (storm, *_) = wait_for(delivered, 150, f"{STORM} to reach the webhook")

    assert storm["status"] == "firing"
    labels = storm["labels"]
    assert labels["job"] == BROKEN  # the service
    assert labels["error_type"] == "500"
    assert labels["crew_otel_origin_operation"] == "http"  # where the errors originate
    assert labels["severity"] == "critical"
    annotations = storm["annotations"]
    for text in annotations.values():
        assert "{{" not in text, text
        assert "<no value>" not in text, text
    runbook = annotations["runbook"]
    assert f"service={BROKEN}" in runbook  # the Jaeger search, filled in
    assert "error.type=500" in runbook
    assert "crew_otel.error.origin=true" in runbook
    assert "HTTP 500" in annotations["summary"]
    # why the runs failed, from crew_otel_failures_total: every run of the broken service fails,
    # with the provider's 500s after every retry or on the Agent another request holds
    causes = annotations["failure_causes"]
    assert re.match(
        rf"\d+ runs of {BROKEN} failed in the last 5 min, by crew_otel.failure.cause \(most "
        r"first\): (provider_error|shared_instance) \d+",
        causes,
    ), causes
    assert "crew_otel.failure.cause=<cause>" in causes

    # where the errors originate: the origin-operation label, on the rule that carries it
    def origins_rising() -> set[tuple[str, str, str]]:
        found = {
            (
                a["labels"]["job"],
                a["labels"]["crew_otel_origin_operation"],
                a["labels"]["error_type"],
            )
            for a in prometheus_alerts(stack["prometheus"])
            if a["labels"]["alertname"] == "CrewOtelErrorOriginsRising" and a["state"] == "firing"
        }
        return found if (BROKEN, "http", "500") in found else set()

    rising = wait_for(origins_rising, 60, "CrewOtelErrorOriginsRising to fire for HTTP 500s")
    assert {job for job, _, _ in rising} == {BROKEN}, rising
    # ... which the shipped inhibit rule keeps from paging twice for one storm
    inhibited = httpx.get(
        f"{stack['alertmanager']}/alerts",
        params={"filter": 'alertname="CrewOtelErrorOriginsRising"'},
        timeout=5,
    ).json()
    assert inhibited
    assert all(a["status"]["inhibitedBy"] for a in inhibited), inhibited
    # An OriginsRising alert that began before the storm fired may have been delivered (there
    # was nothing to inhibit it yet); none that began while the storm fires reaches a person.
    storm_began = storm["startsAt"][:19]  # RFC 3339, compared to the second
    assert [
        a
        for a in webhook.alerts()
        if a["labels"]["alertname"] == "CrewOtelErrorOriginsRising"
        and a["startsAt"][:19] > storm_began
    ] == []

    # the healthy service, same rules, same intervals, same time: ran, and raised nothing
    done = httpx.get(
        f"{stack['prometheus']}/query",
        params={
            "query": f'sum({{job="{FIXED}", __name__=~"gen_ai_.*workflow_duration_seconds_count"}})'
        },
        timeout=5,
    ).json()["data"]["result"]
    assert done
    assert float(done[0]["value"][1]) >= 3, done
    assert [
        a for a in prometheus_alerts(stack["prometheus"]) if a["labels"].get("job") == FIXED
    ] == []
    assert [a for a in webhook.alerts() if a["labels"].get("job") == FIXED] == []
