"""Regression checks for the audit of collector/ and dashboards/ (silent faults 1-14).

Each test states the fault it guards against. Most read the committed assets; the exemplar and
span-kind checks run real crews against the loopback provider and hold the dashboards and the
Collector's tail-sampling policies against what crew_otel actually records.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from crew_otel import attributes as a
from crew_otel import metrics as m
from crew_otel.testing.crews import make_llm, research_crew
from tests.assets_util import (
    COLLECTOR_DIR,
    DASHBOARD_DIR,
    PROMETHEUS_DIR,
    ROOT,
    crew_otel_metric_names,
    dashboard_files,
    iter_panels,
    iter_rules,
    load_dashboard,
    load_yaml,
    prometheus_names,
    substitute_grafana_variables,
)
from tests.workloads import mixed_workload

DASHBOARDS = {path.name: load_dashboard(path) for path in dashboard_files()}
PANELS = [
    (name, panel)
    for name, dashboard in DASHBOARDS.items()
    for panel in iter_panels(dashboard)
    if panel["type"] != "row"
]
SPAN_METRICS_CONFIGS = ("otelcol-config.yaml", "gateway.yaml")
COLLECTOR_README = (COLLECTOR_DIR / "README.md").read_text(encoding="utf-8")


def panel_id(value: Any) -> str:
    name, panel = value
    return f"{name}:{panel['id']}"


def panel_links(panel: dict[str, Any]) -> list[dict[str, Any]]:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])


def result_labels(expr: str) -> set[str]:
    """The labels an expression's result keeps: its first ``by (...)`` grouping, or none when it
    starts with an aggregation without one."""
    if re.match(r"\s*(sum|max|min|avg|count)\s*\(", expr):
        return set()
    match = re.search(r"\bby \(([^)]*)\)", expr)
    return {label.strip() for label in match.group(1).split(",")} if match else set()


# --- selectors --------------------------------------------------------------------------------

SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def selectors(expr: str) -> list[tuple[str, set[tuple[str, str, str]]]]:
    """(metric, {(label, op, value)}) of every ``metric{...}`` selector of an expression."""
    return [
        (metric, {match.groups() for match in MATCHER.finditer(body)})
        for metric, body in SELECTOR.findall(expr)
    ]


# Matchers that select only spans tail sampling always keeps: error.type is set exactly when a
# span's status is ERROR (crew_otel's error recorder sets both), error origins are kept by
# their own policy. promql.FAILED in the generator.
KEPT_MATCHERS = {("error_type", "!=", ""), ("crew_otel_error_origin", "=", "true")}


def kept_selector(matchers: set[tuple[str, str, str]]) -> bool:
    return bool(matchers & KEPT_MATCHERS)


def histogram_targets() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}: {panel['title']!r} {target['refId']}", target)
        for name, panel in PANELS
        for target in panel.get("targets", [])
        if "_bucket{" in target.get("expr", "")
    ]


# --- fault 1: the file export is readable by the user who runs `crew-otel report` ----------


def test_file_export_collector_runs_as_the_invoking_user() -> None:
    """The Collector image runs as uid 10001 and creates the trace file readable by that user
    only (the file exporter has no file-mode setting): compose runs it as the user's uid/gid,
    required from the environment, so `crew-otel report export/traces.jsonl` can read it."""
    collector = load_yaml(COLLECTOR_DIR / "compose.file-export.yaml")["services"]["otel-collector"]
    user = collector.get("user", "")
    assert re.fullmatch(r"\$\{CREW_OTEL_UID:\?[^}$]+\}:\$\{CREW_OTEL_GID:\?[^}$]+\}", user), (
        f"otel-collector must run as ${{CREW_OTEL_UID:?..}}:${{CREW_OTEL_GID:?..}}, not {user!r}"
    )
    trace_file = collector["environment"]["CREW_OTEL_TRACE_FILE"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in collector["volumes"]}
    assert mounts[str(Path(trace_file).parent)] == "./export"
    compose_text = (COLLECTOR_DIR / "compose.file-export.yaml").read_text("utf-8")
    for text in (compose_text, COLLECTOR_README):
        assert "chmod 0777" not in text
        assert "CREW_OTEL_UID" in text
        assert "id -u" in text


def test_file_exporter_settings_are_documented_keys() -> None:
    """The file exporter's keys, against its documented schema (exporter/fileexporter
    config.schema.yaml): no key could set the file mode, hence `user:` above."""
    documented = {
        "path",
        "append",
        "rotation",
        "format",
        "encoding",
        "compression",
        "compression_params",
        "flush_interval",
        "group_by",
        "create_directory",
        "directory_permissions",
    }
    exporters = load_yaml(COLLECTOR_DIR / "file-export.yaml")["exporters"]
    for exporter in exporters.values():
        assert set(exporter) <= documented
        assert set(exporter.get("rotation", {})) <= {
            "max_megabytes",
            "max_days",
            "max_backups",
            "localtime",
        }


# --- fault 2: stat panels show every selected service, not one arbitrary row ---------------


@pytest.mark.parametrize("item", [(n, p) for n, p in PANELS if p["type"] == "stat"], ids=panel_id)
def test_stat_panels_reduce_each_series(item: tuple[str, dict[str, Any]]) -> None:
    """A stat panel reduces each frame to one value. An instant query in table format is ONE
    frame with a row per service, reduced to its last row: one arbitrary service under "All".
    Time series format gives one frame, hence one stat, per series (per service)."""
    _, panel = item
    assert panel["options"]["reduceOptions"]["values"] is False
    for target in panel["targets"]:
        assert target.get("instant") is True
        assert target.get("format") == "time_series", f"{panel['title']}: a table frame"
        if "job" in result_labels(target["expr"]):
            assert "{{job}}" in target.get("legendFormat", ""), "name each service's stat"


# --- fault 3: data links read the service where the frame has it ---------------------------


@pytest.mark.parametrize("item", [(n, p) for n, p in PANELS if panel_links(p)], ids=panel_id)
def test_data_links_use_the_frame_variables(item: tuple[str, dict[str, Any]]) -> None:
    """Table frames have one column per label (``${__data.fields.job}``); ``__field.labels``
    is empty there and the link would open Jaeger with no service. Time series frames (time
    series and stat panels) carry the labels on the field (``${__field.labels.job}``). Every
    label a link reads must be in the panel's (first) query result."""
    _, panel = item
    text = "\n".join(link["url"] for link in panel_links(panel))
    if panel["type"] == "table":
        assert "__field.labels" not in text
        used = set(re.findall(r"\$\{__data\.fields\.([A-Za-z0-9_]+)", text))
    else:
        assert "__data.fields" not in text
        used = set(re.findall(r"\$\{__field\.labels\.([A-Za-z0-9_]+)", text))
    assert "job" in used, "links name the series' service"
    assert used <= result_labels(panel["targets"][0]["expr"])


# --- fault 4: processes without service.instance.id ------------------------------------------

MISSING_INSTANCE = "unset-service-instance-id"


def test_series_without_instance_id_are_named_and_alerted() -> None:
    """Without service.instance.id the exporter sets no instance label and every process of a
    service writes the same series. Prometheus names such series (instead of giving them the
    Collector's address), an alert fires on them, and the docs say how to set the id."""
    scrape = {
        job["job_name"]: job
        for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
    }["crew-otel"]
    assert scrape["honor_labels"] is True, "job/instance must come from the exporter"
    (relabel,) = scrape["relabel_configs"]
    assert relabel == {"target_label": "instance", "replacement": MISSING_INSTANCE}
    (rule,) = [r for _, r in iter_rules() if r.get("alert") == "CrewOtelServiceInstanceIdMissing"]
    assert f'instance="{MISSING_INSTANCE}"' in rule["expr"]
    assert "crew_otel.configure()" in rule["annotations"]["runbook"]
    assert "service.instance.id" in COLLECTOR_README
    assert "CrewOtelServiceInstanceIdMissing" in COLLECTOR_README
    # Per-process panels keep the instance label.
    in_flight = [
        t["expr"]
        for _, p in PANELS
        for t in p.get("targets", [])
        if "crew_otel_kickoffs_active" in t.get("expr", "") and "instance" in t["expr"]
    ]
    assert in_flight


# --- fault 5: exemplars open traces that tail sampling kept ---------------------------------


@pytest.mark.parametrize(("where", "target"), histogram_targets(), ids=lambda v: str(v)[:70])
def test_exemplars_only_where_tail_sampling_keeps_the_trace(
    where: str, target: dict[str, Any]
) -> None:
    """An exemplar is the trace of one recent measurement; tail sampling keeps only traces
    with errors, error origins, shared instances, HTTP resends or slow kickoffs, plus a
    TRACE_SAMPLE_PERCENT share. Exemplars are requested only for series of failed spans."""
    buckets = [(metric, ms) for metric, ms in selectors(target["expr"]) if "_bucket" in metric]
    if target.get("exemplar"):
        assert all(kept_selector(ms) for _, ms in buckets), f"{where}: exemplars of any span"
    else:
        assert not all(kept_selector(ms) for _, ms in buckets), f"{where}: exemplars off"


def test_tail_sampling_keeps_failed_spans_and_the_docs_say_which_exemplars_resolve() -> None:
    for name in SPAN_METRICS_CONFIGS:
        policies = load_yaml(COLLECTOR_DIR / name)["processors"]["tail_sampling"]["policies"]
        status = [p["status_code"] for p in policies if p["type"] == "status_code"]
        assert status == [{"status_codes": ["ERROR"]}], f"{name}: keep every failed trace"
    assert "failed p95" in COLLECTOR_README
    assert "TRACE_SAMPLE_PERCENT" in COLLECTOR_README


def kept_by(policies: list[dict[str, Any]], trace: Iterable[ReadableSpan]) -> bool:
    """The deterministic tail-sampling policies (not the probabilistic baseline, not the
    slow-kickoff condition) applied to the spans of one trace."""
    spans = list(trace)
    for policy in policies:
        kind = policy["type"]
        config = policy.get(kind, {})
        for span in spans:
            attrs = span.attributes or {}
            if kind == "status_code" and span.status.status_code.name in config["status_codes"]:
                return True
            if kind == "boolean_attribute" and attrs.get(config["key"]) is config["value"]:
                return True
            value = attrs.get(config.get("key", ""))
            if (
                kind == "numeric_attribute"
                and isinstance(value, int)
                and config["min_value"] <= value <= config["max_value"]
            ):
                return True
    return False


def matches(matchers: set[tuple[str, str, str]], attributes: dict[str, Any]) -> bool:
    """A point's (or span's) attributes against a selector's matchers (``job`` ignored)."""
    labels = {key.replace(".", "_"): str(value) for key, value in attributes.items()}
    for label, op, value in matchers:
        if label == "job":
            continue
        present = labels.get(label, "")
        if (op == "=" and present != value) or (op == "!=" and present == value):
            return False
    return True


def test_exemplar_traces_of_a_concurrent_mixed_run_are_kept(
    otel: Any, fake_provider: Any, metric_reader: InMemoryMetricReader
) -> None:
    """Every exemplar a dashboard asks for, from a concurrent run with failures, points to a
    trace the Collector's tail sampling keeps whatever the baseline percentage."""
    mixed_workload(fake_provider)
    spans = otel.get_finished_spans()
    traces: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        traces[span.context.trace_id].append(span)
    policies = load_yaml(COLLECTOR_DIR / "otelcol-config.yaml")["processors"]["tail_sampling"][
        "policies"
    ]
    data = metric_reader.get_metrics_data()
    points: dict[str, list[Any]] = defaultdict(list)
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for name in prometheus_names(metric.name, metric.unit or "", "histogram"):
                    points[name].extend(metric.data.data_points)

    checked = 0
    for where, target in histogram_targets():
        if not target.get("exemplar"):
            continue
        for metric, matchers in selectors(target["expr"]):
            if metric.startswith("traces_span_metrics_"):
                # span_metrics exemplars: any span of the selected series
                chosen = [s for s in spans if matches(matchers, dict(s.attributes or {}))]
                trace_ids = {s.context.trace_id for s in chosen}
            else:
                exemplars = [
                    e
                    for p in points[metric]
                    if matches(matchers, dict(p.attributes))
                    for e in p.exemplars
                ]
                trace_ids = {e.trace_id for e in exemplars}
            for trace_id in trace_ids:
                assert kept_by(policies, traces[trace_id]), f"{where}: exemplar trace dropped"
                checked += 1
    assert checked >= 4, "the failed runs' exemplars were checked"


# --- fault 6: HTTP attempts with the httpx instrumentation's default (old) names -------------


def http_attempts_expr() -> str:
    (expr,) = [
        t["expr"]
        for _, p in PANELS
        if p["title"] == "HTTP attempts by status and host"
        for t in p["targets"]
    ]
    return substitute_grafana_variables(expr)


def test_http_attempts_panel_counts_old_new_and_dup_semconv_once(tmp_path: Path) -> None:
    """The httpx instrumentation records http.client.duration (ms, http.status_code, no host)
    unless OTEL_SEMCONV_STABILITY_OPT_IN=http (http.client.request.duration, s) or http/dup
    (both). The panel counts each process once, whichever it sends (promtool evaluates it)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH (Debian/Ubuntu: apt-get install prometheus)"
    old = "http_client_duration_milliseconds_count"
    new = "http_client_request_duration_seconds_count"
    series = [
        # default (old) conventions: 60 attempts a minute, status 500
        (f'{old}{{job="old", instance="1", http_status_code="500", http_method="POST"}}', 60),
        # stable conventions: 120 a minute
        (
            f'{new}{{job="new", instance="2", server_address="127.0.0.1", '
            'http_response_status_code="200", http_request_method="POST"}',
            120,
        ),
        # http/dup: the same 30 attempts under both names
        (f'{old}{{job="dup", instance="3", http_status_code="200", http_method="POST"}}', 30),
        (
            f'{new}{{job="dup", instance="3", server_address="127.0.0.1", '
            'http_response_status_code="200", http_request_method="POST"}',
            30,
        ),
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": s, "values": f"0+{per_minute}x20"} for s, per_minute in series
                ],
                "promql_expr_test": [
                    {
                        "expr": http_attempts_expr(),
                        "eval_time": "15m",
                        "exp_samples": [
                            {"labels": '{job="old", http_response_status_code="500"}', "value": 1},
                            {
                                "labels": '{job="new", server_address="127.0.0.1", '
                                'http_response_status_code="200"}',
                                "value": 2,
                            },
                            {
                                "labels": '{job="dup", server_address="127.0.0.1", '
                                'http_response_status_code="200"}',
                                "value": 0.5,
                            },
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "http_attempts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [promtool, "test", "rules", path.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- fault 7: Jaeger's Monitor tab and crew_otel's span kinds -------------------------------


def test_spans_are_internal_or_client_and_the_docs_say_so(otel: Any, fake_provider: Any) -> None:
    """Jaeger's Monitor tab opens on SERVER spans (a browser-side default no configuration
    changes). crew_otel records INTERNAL and CLIENT spans only: the docs and the dashboards'
    Monitor link tell the user to pick those kinds."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(
            pool.map(
                lambda i: research_crew(lambda: make_llm(fake_provider.base_url)).kickoff(
                    inputs={"topic": f"[[kind{i}]]"}
                ),
                range(4),
            )
        )
    kinds = {span.kind for span in otel.get_finished_spans()}
    assert kinds == {SpanKind.INTERNAL, SpanKind.CLIENT}
    chat = [s for s in otel.get_finished_spans() if s.name.startswith(a.SPAN_CHAT + " ")]
    assert chat
    assert {s.kind for s in chat} == {SpanKind.CLIENT}

    jaeger = (COLLECTOR_DIR / "jaeger" / "config.yaml").read_text("utf-8")
    for text in (jaeger, COLLECTOR_README):
        assert re.search(r"Span Kind", text)
        assert '"Internal"' in text
        assert '"Client"' in text
    for dashboard in DASHBOARDS.values():
        (monitor,) = [
            link for link in dashboard["links"] if link.get("url", "").endswith("/monitor")
        ]
        assert "Internal" in monitor["tooltip"]
        assert "Client" in monitor["tooltip"]


# --- fault 8: span metrics keep job / instance ------------------------------------------------

# connector/spanmetricsconnector config.schema.yaml (otelcol-contrib), top-level keys.
SPAN_METRICS_KEYS = {
    "add_resource_attributes",
    "aggregation_cardinality_limit",
    "aggregation_temporality",
    "calls_dimensions",
    "dimensions",
    "dimensions_cache_size",
    "enable_metrics_sampling_method",
    "events",
    "exclude_dimensions",
    "exemplars",
    "histogram",
    "include_instrumentation_scope",
    "metric_timestamp_cache_size",
    "metrics_expiration",
    "metrics_flush_interval",
    "namespace",
    "resource_metrics_cache_size",
    "resource_metrics_key_attributes",
    "series_expiration",
}


@pytest.mark.parametrize("name", SPAN_METRICS_CONFIGS)
def test_span_metrics_keep_resource_attributes(name: str) -> None:
    """The connector drops resource attributes (service.name -> job, service.instance.id ->
    instance) once its gate connector.spanmetrics.excludeResourceMetrics becomes the default;
    ``add_resource_attributes: true`` keeps them, and with them every span-metrics panel."""
    connector = load_yaml(COLLECTOR_DIR / name)["connectors"]["span_metrics"]
    assert connector.get("add_resource_attributes") is True
    assert set(connector) <= SPAN_METRICS_KEYS


# --- names from the package's constants --------------------------------------------------------


def test_dashboards_read_the_package_metric_names() -> None:
    """Every crew_otel metric a dashboard reads is one the package creates (names and units from
    crew_otel.metrics), so a renamed instrument fails here and in the up-to-date check."""
    used = {
        metric
        for _, panel in PANELS
        for target in panel.get("targets", [])
        for metric, _ in selectors(target.get("expr", ""))
        if metric.startswith(("crew_otel_", "gen_ai_"))
    }
    assert used
    assert used <= crew_otel_metric_names()
    assert {n.split("_bucket")[0] for n in used if n.endswith("_bucket")} >= {
        name.replace(".", "_") + "_seconds"
        for name in (m.WORKFLOW_DURATION, m.AGENT_DURATION, m.TOOL_DURATION)
    }


def test_generator_takes_names_from_the_package() -> None:
    """The generator imports its names; no dashboard module spells a crew_otel metric or
    attribute name itself."""
    modules = sorted((DASHBOARD_DIR / "crew_otel_dashboards").glob("*.py"))
    assert len(modules) >= 7
    for path in modules:
        text = path.read_text(encoding="utf-8")
        for literal in re.findall(r"\"((?:crew_otel|gen_ai)[._][a-z_.]+)\"", text):
            pytest.fail(f"{path.relative_to(ROOT)}: spells {literal!r}; import it instead")


# --- fault 9: no deprecated, no-op resource_to_telemetry_conversion --------------------------


def collector_yaml_files() -> list[Path]:
    return sorted(p for p in COLLECTOR_DIR.glob("*.yaml") if not p.name.startswith("compose"))


def test_no_deprecated_resource_to_telemetry_conversion() -> None:
    """The prometheus (and prometheus_remote_write) exporters deprecate
    ``resource_to_telemetry_conversion`` for ``resource_constant_labels``; the feature gate
    exporter.prometheus.DisableResourceToTelemetryConversion rejects any non-empty block, and
    ``enabled: false`` was the default anyway. Nothing here needs resource attributes as labels
    (job / instance come from service.name / service.instance.id)."""
    for path in collector_yaml_files():
        config = load_yaml(path)
        for cid, settings in (config.get("exporters") or {}).items():
            exporter = settings or {}
            assert "resource_to_telemetry_conversion" not in exporter, f"{path.name}: {cid}"
            if cid.split("/")[0] == "prometheus":
                assert not exporter.get("resource_constant_labels"), f"{path.name}: {cid}"


# --- fault 10: image tags that exist, and no version claim nothing here can back -------------

# Collector image tags confirmed as published (collector/README.md, "Versions": pinned in other
# public deployments, 0.160.0 twice with the same digest). Add a tag only after checking it.
VERIFIED_COLLECTOR_TAGS = {"0.160.0"}
VERIFIED_IMAGES = {
    "jaegertracing/jaeger": {"2.17.0"},
    "prom/prometheus": {"v3.5.0"},
    "prom/alertmanager": {"v0.28.1"},
    "grafana/grafana": {"12.2.1"},
    "otel/opentelemetry-collector-contrib": VERIFIED_COLLECTOR_TAGS,
}
UNBACKED_CLAIM = re.compile(r"checked against v?0\.\d+|0\.165", re.IGNORECASE)


def test_compose_images_are_verified_tags() -> None:
    for name in ("compose.yaml", "compose.file-export.yaml"):
        for service_name, service in load_yaml(COLLECTOR_DIR / name)["services"].items():
            if "image" not in service:
                continue
            repo, _, tag = service["image"].rpartition(":")
            assert tag in VERIFIED_IMAGES.get(repo, set()), f"{name}: {service_name} {tag!r}"
    readme_tags = set(
        re.findall(r"opentelemetry-collector-contrib:(\d+\.\d+\.\d+)", COLLECTOR_README)
    )
    assert readme_tags == VERIFIED_COLLECTOR_TAGS, "the README names the pinned tag"
    assert "digest" in COLLECTOR_README


def test_no_unbacked_version_claims() -> None:
    texts = [
        *COLLECTOR_DIR.rglob("*.yaml"),
        *COLLECTOR_DIR.rglob("*.yml"),
        *COLLECTOR_DIR.rglob("*.md"),
    ]
    texts += [ROOT / "tests" / "test_assets.py"]
    for path in texts:
        match = UNBACKED_CLAIM.search(path.read_text(encoding="utf-8"))
        assert match is None, f"{path.relative_to(ROOT)}: {match.group(0) if match else ''}"


# --- fault 11: the gateways' series are told apart by a label that is the gateway -------------


def test_gateway_series_carry_the_gateway_not_a_misnamed_instance() -> None:
    """Span metrics keep the application's service.instance.id as ``instance``
    (add_resource_attributes, honor_labels): two gateways export identical label sets for the
    spans of one process, and Prometheus would interleave them as one series. A per-gateway
    constant label keeps them apart; the comment no longer tells to sum across ``instance``."""
    gateway = load_yaml(COLLECTOR_DIR / "gateway.yaml")
    labels = gateway["exporters"]["prometheus"].get("const_labels", {})
    assert labels, "a per-gateway label"
    (value,) = labels.values()
    assert re.fullmatch(r"\$\{env:[A-Z_]+\}", str(value)), "set per gateway from its environment"
    assert gateway["connectors"]["span_metrics"]["add_resource_attributes"] is True
    text = (COLLECTOR_DIR / "gateway.yaml").read_text("utf-8")
    assert "sum across `instance`" not in text
    assert "NOT the gateway" in text
    for _, panel in PANELS:
        for target in panel.get("targets", []):
            if "traces_span_metrics" in target.get("expr", ""):
                assert "otel_gateway" not in result_labels(target["expr"])


# --- fault 12: every provisioning folder Grafana reads, and every mounted host path, exist ---

# Grafana (OSS) provisions these folders under its provisioning path and logs an error at every
# start for each one it cannot read.
GRAFANA_PROVISIONING_FOLDERS = {"datasources", "dashboards", "alerting", "plugins"}
# Host paths the user creates, documented in the compose file's header, ignored by git.
OUTPUT_MOUNTS = {"./export": "mkdir -p export"}


def host_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of a service's bind mounts (named volumes left out)."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


@pytest.mark.parametrize("name", ["compose.yaml", "compose.file-export.yaml"])
def test_compose_mounts_exist_in_the_repository(name: str) -> None:
    text = (COLLECTOR_DIR / name).read_text("utf-8")
    gitignore = (ROOT / ".gitignore").read_text("utf-8")
    for service_name, service in load_yaml(COLLECTOR_DIR / name)["services"].items():
        for source, _ in host_mounts(service):
            if source in OUTPUT_MOUNTS:
                assert OUTPUT_MOUNTS[source] in text, f"{name}: how {source} is created"
                assert f"collector/{source.removeprefix('./')}/" in gitignore
                continue
            assert (COLLECTOR_DIR / source).exists(), f"{name}: {service_name} mounts {source}"


def test_grafana_provisioning_tree_matches_what_grafana_reads() -> None:
    grafana = load_yaml(COLLECTOR_DIR / "compose.yaml")["services"]["grafana"]
    (source,) = [s for s, target in host_mounts(grafana) if target == "/etc/grafana/provisioning"]
    provisioning = (COLLECTOR_DIR / source).resolve()
    folders = {p.name for p in provisioning.iterdir() if p.is_dir()}
    assert folders == GRAFANA_PROVISIONING_FOLDERS
    for folder in sorted(folders):
        # A file Grafana can parse, and one `crew-otel stack` copies (no dotfile).
        files = [p for p in (provisioning / folder).iterdir() if p.suffix in {".yaml", ".yml"}]
        assert files, f"{folder}/ has no provisioning file"
        for path in files:
            assert load_yaml(path)["apiVersion"] == 1, path.name


# --- fault 13: the agent queues and retries before routing -----------------------------------


def test_agent_load_balancing_retries_at_the_top_level() -> None:
    """Queue and retry at the top level of load_balancing (loadbalancingexporter README,
    "Resilience"): a batch for a gateway that vanished is retried through the updated ring.
    The per-gateway OTLP exporters have no queue (it would accept, then drop, the batch) and no
    retries of their own (the failure must reach the top level)."""
    lb = load_yaml(COLLECTOR_DIR / "agent.yaml")["exporters"]["load_balancing"]
    assert lb["sending_queue"]["enabled"] is True
    assert "batch" in lb["sending_queue"]
    assert lb["retry_on_failure"]["enabled"] is True
    assert lb["retry_on_failure"]["max_elapsed_time"] not in (0, "0s")
    assert "timeout" in lb
    otlp = lb["protocol"]["otlp"]
    assert otlp.get("sending_queue", {}).get("enabled") is False
    assert otlp.get("retry_on_failure", {}).get("enabled") is False
    assert set(lb) <= {
        "routing_key",
        "routing_attributes",
        "protocol",
        "resolver",
        "timeout",
        "retry_on_failure",
        "sending_queue",
    }


# --- fault 14: the dashboards and the provider agree on editing -------------------------------


def test_dashboards_editable_flag_matches_the_provider() -> None:
    (provider,) = load_yaml(
        COLLECTOR_DIR / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
    )["providers"]
    assert provider["allowUiUpdates"] is False, "read-only: the JSON is generated"
    for name, dashboard in DASHBOARDS.items():
        assert dashboard["editable"] is provider["allowUiUpdates"], name


# --- `crew-otel assets DIR` where DIR cannot take them: one line, exit status 2 ---------------


def assets_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    """``crew-otel assets ARGS`` in this process: exit status, stdout, stderr lines."""
    from crew_otel.cli.main import main

    capsys.readouterr()
    code = main(["assets", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err.splitlines()


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_assets_into_a_file_names_it_and_exits_2(tmp_path: Path, capsys: Any) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    for directory in (existing, existing / "stack"):
        code, out, errors = assets_cli(capsys, str(directory))
        assert (code, out) == (2, "")
        assert errors == [f"crew-otel assets: error: {existing} is a file, not a directory"]
    assert existing.read_text() == "mine"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_directory_where_an_asset_file_goes_stops_before_writing(
    tmp_path: Path, capsys: Any, force: bool
) -> None:
    """--force overwrites files that differ; it never replaces a directory."""
    (tmp_path / "collector" / "compose.yaml").mkdir(parents=True)
    before = tree(tmp_path)
    code, out, errors = assets_cli(capsys, str(tmp_path), *(["--force"] if force else []))
    assert (code, out) == (2, "")
    assert errors == [
        f"crew-otel assets: error: {tmp_path / 'collector' / 'compose.yaml'} is a directory "
        "where the file collector/compose.yaml goes; nothing was written"
    ]
    assert tree(tmp_path) == before


def test_a_file_where_an_asset_directory_goes_stops_before_writing(
    tmp_path: Path, capsys: Any
) -> None:
    (tmp_path / "dashboards").write_text("mine")
    code, out, errors = assets_cli(capsys, str(tmp_path))
    assert (code, out) == (2, "")
    assert errors == [
        f"crew-otel assets: error: {tmp_path / 'dashboards'} is a file where the directory "
        "dashboards goes; nothing was written"
    ]
    assert tree(tmp_path) == ["dashboards"]


def test_a_directory_nobody_can_write_names_it_and_exits_2(capsys: Any) -> None:
    """sysfs refuses new entries even to root (tests run as root in CI, where a chmod 0o555
    directory stays writable)."""
    directory = Path("/sys")
    with pytest.raises(OSError) as refused:
        os.mkdir(directory / "collector")
    code, out, errors = assets_cli(capsys, str(directory))
    assert (code, out) == (2, "")
    assert errors == [
        f"crew-otel assets: error: cannot create directory {directory / 'collector'}: "
        f"{refused.value.strerror}"
    ]


def test_start_command_quotes_a_directory_with_spaces(tmp_path: Path, capsys: Any) -> None:
    directory = tmp_path / "my stack" / "it's here"
    code, out, errors = assets_cli(capsys, str(directory))
    assert (code, errors) == (0, [])
    command = f"cd {shlex.quote(str(directory / 'collector'))} && docker compose up -d"
    assert f"Start the stack: {command}" in out.splitlines()
    assert shlex.split(command)[1] == str(directory / "collector")
    assert (directory / "collector" / "compose.yaml").is_file()
