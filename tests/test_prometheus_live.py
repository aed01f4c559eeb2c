"""Every PromQL expression of the dashboards and alert rules, against a real Prometheus.

A concurrent mixed CrewAI run exposes crew_otel's metrics on a Prometheus endpoint (the
``opentelemetry-exporter-prometheus`` reader); a real ``prometheus`` server on 127.0.0.1 scrapes
it; then each expression is run: it must parse and evaluate, every dashboard panel the run
should light up must return data, and every metric name the assets use must exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.assets_util import metric_names, promql_expressions, recording_rule_names
from tests.support.waiting import free_port, wait_for

HERE = Path(__file__).resolve().parent
# Panels fed by the Collector's span_metrics connector: no Collector in this test.
SPAN_METRICS_PREFIX = "traces_span_metrics_"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "the prometheus server is not installed (Debian package 'prometheus')"
    workdir = tmp_path_factory.mktemp("prometheus")
    app_port, prom_port = free_port(), free_port()
    # http/dup: the httpx instrumentation records its default (old) HTTP metric names and the
    # stable ones, so the dashboards' queries of both are evaluated against real series.
    env = {**os.environ, "OTEL_SEMCONV_STABILITY_OPT_IN": "http/dup"}
    app = subprocess.Popen(
        [sys.executable, str(HERE / "live_metrics_app.py"), str(app_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=HERE.parent,
    )
    config = workdir / "prometheus.yml"
    rules = HERE.parent / "collector" / "prometheus" / "alerts.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {rules}\n"
        "scrape_configs:\n  - job_name: support-api\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{app_port}']\n"
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--enable-feature=exemplar-storage",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        assert app.stdout is not None
        # CrewAI prints to stdout too: read until the workload says it is done
        for line in app.stdout:
            if line.strip() == "READY":
                break
        else:
            raise AssertionError(f"the instrumented workload failed (exit {app.wait()})")
        ready_at = time.time()
        with httpx.Client(timeout=10) as client:

            def query(expr: str) -> dict:
                return client.get(f"{base}/query", params={"query": expr}).json()

            def scraped() -> bool:
                try:
                    result = query("count_over_time(crew_otel_retries_total[1m])")
                except httpx.HTTPError:
                    return False
                values = [float(r["value"][1]) for r in result.get("data", {}).get("result", [])]
                return bool(values) and min(values) >= 3

            wait_for(scraped, 60, "Prometheus to scrape the workload three times")

            def scraped_twice_after_the_workload() -> bool:
                # rate()/increase() need two samples of every series: a series made late in
                # a slow workload (a run that failed after its retries) may have had only one.
                result = query('timestamp(up{job="support-api"})')["data"]["result"]
                return bool(result) and float(result[0]["value"][1]) >= ready_at + 2.5

            wait_for(scraped_twice_after_the_workload, 60, "two scrapes after the workload")
            wait_for(
                lambda: query("crew_otel:kickoff_concurrency_limit")["data"]["result"],
                30,
                "the recording rules to be evaluated",
            )
            yield query, client, base
    finally:
        server.terminate()
        if app.stdin:
            app.stdin.close()
        app.terminate()
        server.wait(timeout=20)
        app.wait(timeout=20)


EXPRESSIONS = promql_expressions()


@pytest.mark.parametrize(("source", "expr"), EXPRESSIONS, ids=[s for s, _ in EXPRESSIONS])
def test_expression_parses_and_evaluates(prometheus, source, expr):
    query, _, _ = prometheus
    result = query(expr)
    assert result["status"] == "success", (source, result.get("error"))
    if source.startswith("dashboards/") and not any(
        name.startswith(SPAN_METRICS_PREFIX) for name in metric_names(expr)
    ):
        assert result["data"]["result"], f"{source} returns no data after the run:\n{expr}"


def test_every_metric_name_the_assets_use_is_emitted(prometheus):
    _, client, base = prometheus
    emitted = set(client.get(f"{base}/label/__name__/values").json()["data"])
    used = set().union(*(metric_names(expr) for _, expr in EXPRESSIONS))
    missing = {
        name
        for name in used - emitted - recording_rule_names()
        if not name.startswith(SPAN_METRICS_PREFIX)
    }
    assert missing == set()


def test_the_crosstalk_alert_fires_and_names_no_request_or_content(prometheus):
    """The workload's two requests sharing a ticket through a module global: CrewOtelCrossTalk
    fires (critical) for the service, workflow and where the data entered, and its text holds
    neither request IDs nor tickets."""
    _, client, base = prometheus

    def firing() -> list[dict]:
        alerts = client.get(f"{base}/alerts").json()["data"]["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "CrewOtelCrossTalk" and a["state"] == "firing"
        ]

    alerts = wait_for(firing, 30, "CrewOtelCrossTalk to fire")
    assert {a["labels"]["crew_otel_crosstalk_source"] for a in alerts} >= {"tool_result"}
    for alert in alerts:
        assert alert["labels"]["job"] == "support-api"
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["gen_ai_workflow_name"]
        text = " ".join(alert["annotations"].values())
        assert "crew_otel.crosstalk=true" in text
        for secret in ("crosstalk-0", "crosstalk-1", "TCK-", "48210", "48211"):
            assert secret not in text + str(alert["labels"])
