"""Checks on the bundled observability assets: Collector configs, compose stack, Prometheus
rules and Grafana dashboards. Imports no crewai; the metric names come from crew_otel's
instruments (tests/assets_util.py) and the generator imports crew_otel's constants. The checks
for the audit's faults are in test_assets_faults.py.

Needs: pyyaml, jsonschema, grafana-foundation-sdk (Python >= 3.11, for the dashboard
generator) and promtool on PATH (Debian/Ubuntu: apt-get install prometheus).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

try:  # tests/ as a package (rootdir on sys.path) or as a plain directory
    from tests.assets_util import (
        COLLECTOR_DIR,
        DASHBOARD_DIR,
        EMITTED_METRIC_NAMES,
        PROMETHEUS_DIR,
        ROOT,
        dashboard_files,
        iter_panels,
        iter_rules,
        load_dashboard,
        load_yaml,
        metric_names,
        promql_expressions,
        recording_rule_names,
    )
except ImportError:
    from assets_util import (  # type: ignore[no-redef]
        COLLECTOR_DIR,
        DASHBOARD_DIR,
        EMITTED_METRIC_NAMES,
        PROMETHEUS_DIR,
        ROOT,
        dashboard_files,
        iter_panels,
        iter_rules,
        load_dashboard,
        load_yaml,
        metric_names,
        promql_expressions,
        recording_rule_names,
    )

# --- promtool ------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH. Install it (Debian/Ubuntu: apt-get install prometheus) "
            "to check and unit-test collector/prometheus/alerts.yml."
        )
    return path


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    result = run([promtool(), "check", "rules", "alerts.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run([promtool(), "test", "rules", "alerts_test.yml"], PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL: promtool parses them as recording rules."""
    dashboard_exprs = [
        (source, expr) for source, expr in promql_expressions() if source.startswith("dashboards")
    ]
    assert dashboard_exprs
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(dashboard_exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = run([promtool(), "check", "rules", str(path)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- alert rules ---------------------------------------------------------------------------

ALERTS = [rule for _, rule in iter_rules() if "alert" in rule]


def test_expected_alerts_exist() -> None:
    names = {rule["alert"] for rule in ALERTS}
    assert {
        "CrewOtelErrorOriginsRising",
        "CrewOtelProvider5xxStorm",
        "CrewOtelProvider429Storm",
        "CrewOtelRetryAmplification",
        "CrewOtelSharedInstanceConflict",
        "CrewOtelCrossTalk",
        "CrewOtelFailuresFromSharing",
        "CrewOtelKickoffsNearLimit",
        "CrewOtelWorkflowErrorRatioHigh",
    } <= names


@pytest.mark.parametrize("rule", ALERTS, ids=lambda r: r["alert"])
def test_alert_annotations(rule: dict[str, Any]) -> None:
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook"):
        assert annotations.get(key, "").strip(), f"{rule['alert']}: missing {key}"
    runbook = annotations["runbook"]
    assert "Jaeger" in runbook
    assert re.search(r"\b[a-z_]+\.[a-z_.]+=\S", runbook), (
        f"{rule['alert']}: the runbook should give a Jaeger tag query (key=value)"
    )
    assert "Suspect" in runbook or "Fix" in runbook
    assert rule.get("labels", {}).get("severity") in {"warning", "critical"}


def test_crosstalk_alert_is_critical_and_names_no_request() -> None:
    """A data leak between users pages; its text never carries a request ID or content."""
    (rule,) = [r for r in ALERTS if r["alert"] == "CrewOtelCrossTalk"]
    assert rule["labels"]["severity"] == "critical"
    assert "crew_otel_crosstalk_total" in rule["expr"]
    text = " ".join(rule["annotations"].values())
    assert "crew_otel.crosstalk=true" in text
    used = set(re.findall(r"\$labels\.(\w+)", text))
    assert used <= {"job", "gen_ai_workflow_name", "crew_otel_crosstalk_source"}, used


FAILURE_CAUSE_LABEL = "crew_otel_failure_cause"


def test_error_origin_and_storm_alerts_name_the_failed_runs_causes() -> None:
    """The pages about errors say why runs failed (crew_otel.failure.cause, most common first)
    from crew_otel_failures_total, through a query in the annotation: a label would change the
    alert's identity, and restart its ``for``, whenever the top cause changes."""
    (record,) = [r for _, r in iter_rules() if r.get("record") == "crew_otel:failures:increase5m"]
    assert "crew_otel_failures_total" in record["expr"]
    assert f"by (job, {FAILURE_CAUSE_LABEL})" in record["expr"]
    for name in (
        "CrewOtelErrorOriginsRising",
        "CrewOtelProvider5xxStorm",
        "CrewOtelProvider429Storm",
    ):
        (rule,) = [r for r in ALERTS if r["alert"] == name]
        text = rule["annotations"]["failure_causes"]
        assert "crew_otel:failures:increase5m" in text, name
        assert "| query" in text, name
        assert f"Labels.{FAILURE_CAUSE_LABEL}" in text, name
        assert "crew_otel.failure.cause=" in text, name


def test_sharing_failures_alert_is_critical_and_names_no_request() -> None:
    """Runs failed by sharing are a bug every time: a critical page that names the cause and
    the Jaeger search, never a request ID or content."""
    (rule,) = [r for r in ALERTS if r["alert"] == "CrewOtelFailuresFromSharing"]
    assert rule["labels"]["severity"] == "critical"
    assert 'crew_otel_failure_cause=~"shared_instance|shared_state"' in rule["expr"]
    assert "for" not in rule
    text = " ".join(rule["annotations"].values())
    assert "crew_otel.failure.cause={{ $labels.crew_otel_failure_cause }}" in text
    assert "crew_otel.failure.shared_instance.name" in text
    used = set(re.findall(r"\$labels\.(\w+)", text))
    assert used <= {"job", "gen_ai_workflow_name", FAILURE_CAUSE_LABEL}, used
    assert "request.id" not in text


def test_sharing_failures_page_once_with_the_conflicts_they_explain() -> None:
    """A shared object that fails runs also raises CrewOtelSharedInstanceConflict for the same
    service: the shipped Alertmanager config notifies about the failures only."""
    config = load_yaml(COLLECTOR_DIR / "alertmanager" / "alertmanager.yml")
    assert any(
        "CrewOtelFailuresFromSharing" in " ".join(rule["source_matchers"])
        and "CrewOtelSharedInstanceConflict" in " ".join(rule["target_matchers"])
        and rule["equal"] == ["job"]
        for rule in config["inhibit_rules"]
    )


def test_every_alert_has_firing_and_silent_cases() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for alert_test in case.get("alert_rule_test", []):
            name = alert_test["alertname"]
            (firing if alert_test.get("exp_alerts") else silent).add(name)
    names = {rule["alert"] for rule in ALERTS}
    assert names - firing == set(), "alerts without a firing test case"
    assert names - silent == set(), "alerts without a silent test case"


# --- Collector configs ---------------------------------------------------------------------

SIGNALS = {"traces", "metrics", "logs", "profiles"}
KINDS = ("receivers", "processors", "exporters", "connectors", "extensions")

# Component types of otelcol-contrib under the lower_snake_case names (v0.154+; compose.yaml
# pins 0.160.0) that these configs may use.
CURRENT_TYPES = {
    "receivers": {"otlp", "prometheus"},
    "processors": {"memory_limiter", "tail_sampling", "resource", "attributes", "transform"},
    "exporters": {
        "otlp_grpc",
        "otlp_http",
        "load_balancing",
        "prometheus",
        "prometheus_remote_write",
        "file",
        "debug",
    },
    "connectors": {"span_metrics", "forward", "routing", "service_graph"},
    "extensions": {"health_check", "bearertokenauth", "basicauth", "pprof", "zpages"},
}
# Old names (deprecated aliases) and the batch processor, which these configs replace with
# the exporters' sending_queue batching.
REJECTED_TYPES = {
    ("exporters", "otlp"): "otlp_grpc",
    ("exporters", "otlphttp"): "otlp_http",
    ("exporters", "loadbalancing"): "load_balancing",
    ("exporters", "prometheusremotewrite"): "prometheus_remote_write",
    ("connectors", "spanmetrics"): "span_metrics",
    ("connectors", "servicegraph"): "service_graph",
    ("processors", "batch"): "sending_queue.batch on the exporters",
    ("processors", "spanmetrics"): "the span_metrics connector",
}
# Connectors: (signal they consume as an exporter, signal they produce as a receiver).
CONNECTOR_SIGNALS = {"span_metrics": ("traces", "metrics"), "service_graph": ("traces", "metrics")}

COLLECTOR_CONFIGS = {
    "otelcol-config.yaml": ["otelcol-config.yaml"],
    "otelcol-config.yaml+file-export.yaml": ["otelcol-config.yaml", "file-export.yaml"],
    "gateway.yaml": ["gateway.yaml"],
    "gateway.yaml+file-export.yaml": ["gateway.yaml", "file-export.yaml"],
    "agent.yaml": ["agent.yaml"],
}


def merge(base: Any, overlay: Any) -> Any:
    """The Collector's merge of several --config files: maps merge, other values replace."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return overlay


def load_collector_config(files: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in files:
        config = merge(config, load_yaml(COLLECTOR_DIR / name))
    return config


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def check_pipeline_graph(config: dict[str, Any]) -> None:
    """References are defined, definitions are used, connectors join two pipelines."""
    defined = {kind: set((config.get(kind) or {}).keys()) for kind in KINDS}
    service = config["service"]
    pipelines = service["pipelines"]
    used: dict[str, set[str]] = {kind: set() for kind in KINDS}
    connector_as_exporter: dict[str, set[str]] = {}
    connector_as_receiver: dict[str, set[str]] = {}

    for pipeline_id, pipeline in pipelines.items():
        signal = component_type(pipeline_id)
        assert signal in SIGNALS, f"pipeline {pipeline_id}: unknown signal {signal}"
        assert pipeline.get("receivers"), f"pipeline {pipeline_id} has no receivers"
        assert pipeline.get("exporters"), f"pipeline {pipeline_id} has no exporters"
        for role, kind in (("receivers", "receivers"), ("exporters", "exporters")):
            for cid in pipeline.get(role, []):
                if cid in defined["connectors"]:
                    used["connectors"].add(cid)
                    side = connector_as_receiver if role == "receivers" else connector_as_exporter
                    side.setdefault(cid, set()).add(pipeline_id)
                else:
                    assert cid in defined[kind], f"pipeline {pipeline_id}: {cid} is not defined"
                    used[kind].add(cid)
        for cid in pipeline.get("processors", []):
            assert cid in defined["processors"], f"pipeline {pipeline_id}: {cid} is not defined"
            used["processors"].add(cid)
    for cid in service.get("extensions", []):
        assert cid in defined["extensions"], f"service.extensions: {cid} is not defined"
        used["extensions"].add(cid)

    for kind in KINDS:
        unused = defined[kind] - used[kind]
        assert not unused, f"{kind} defined but not used in any pipeline: {sorted(unused)}"

    for cid in defined["connectors"]:
        exporting = connector_as_exporter.get(cid, set())
        receiving = connector_as_receiver.get(cid, set())
        assert exporting, f"connector {cid} is not an exporter of any pipeline"
        assert receiving, f"connector {cid} is not a receiver of any pipeline"
        assert exporting.isdisjoint(receiving), f"connector {cid} loops within one pipeline"
        expected = CONNECTOR_SIGNALS.get(component_type(cid))
        for pipeline_id in exporting:
            if expected:
                assert component_type(pipeline_id) == expected[0], (cid, pipeline_id)
        for pipeline_id in receiving:
            if expected:
                assert component_type(pipeline_id) == expected[1], (cid, pipeline_id)
        if component_type(cid) == "forward":
            signals = {component_type(p) for p in exporting | receiving}
            assert len(signals) == 1, f"forward connector {cid} joins different signals"


@pytest.mark.parametrize("name", list(COLLECTOR_CONFIGS))
def test_collector_pipeline_graph(name: str) -> None:
    check_pipeline_graph(load_collector_config(COLLECTOR_CONFIGS[name]))


@pytest.mark.parametrize("name", list(COLLECTOR_CONFIGS))
def test_collector_component_names_are_current(name: str) -> None:
    config = load_collector_config(COLLECTOR_CONFIGS[name])
    for kind in KINDS:
        for cid in config.get(kind) or {}:
            ctype = component_type(cid)
            if (kind, ctype) in REJECTED_TYPES:
                pytest.fail(f"{name}: {kind} {cid!r}: use {REJECTED_TYPES[kind, ctype]}")
            assert ctype in CURRENT_TYPES[kind], f"{name}: unknown {kind[:-1]} type {ctype!r}"


@pytest.mark.parametrize(
    "name", ["otelcol-config.yaml", "gateway.yaml", "agent.yaml", "file-export.yaml"]
)
def test_collector_env_substitutions(name: str) -> None:
    text = (COLLECTOR_DIR / name).read_text(encoding="utf-8")
    for ref in re.findall(r"\$\{[^}]*\}", text):
        assert re.fullmatch(r"\$\{env:[A-Z_][A-Z0-9_]*(:-[^}]*)?\}", ref), (
            f"{name}: {ref} is not an ${{env:NAME}} or ${{env:NAME:-default}} reference"
        )
    assert re.search(r"\$(?!\{)", text.replace("$$", "")) is None, f"{name}: stray $"


@pytest.mark.parametrize("name", ["otelcol-config.yaml", "agent.yaml"])
def test_local_receivers_default_to_localhost(name: str) -> None:
    config = load_yaml(COLLECTOR_DIR / name)
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "${env:OTLP_BIND:-127.0.0.1}:4317"
    assert protocols["http"]["endpoint"] == "${env:OTLP_BIND:-127.0.0.1}:4318"


@pytest.mark.parametrize("name", ["otelcol-config.yaml", "gateway.yaml"])
def test_sampling_and_span_metrics_layout(name: str) -> None:
    config = load_yaml(COLLECTOR_DIR / name)
    pipelines = config["service"]["pipelines"]

    # span_metrics sees every span: it is fed by a pipeline without tail sampling.
    feeding = [p for p in pipelines.values() if "span_metrics" in p.get("exporters", [])]
    assert feeding
    for pipeline in feeding:
        assert not any(component_type(c) == "tail_sampling" for c in pipeline.get("processors", []))
    assert any("span_metrics" in p.get("receivers", []) for p in pipelines.values())

    # Jaeger gets the tail-sampled traces over OTLP gRPC.
    sampled = [p for p in pipelines.values() if "tail_sampling" in p.get("processors", [])]
    assert sampled
    assert all("otlp_grpc/jaeger" in p["exporters"] for p in sampled)
    assert config["exporters"]["otlp_grpc/jaeger"]["endpoint"].endswith("jaeger:4317}")

    span_metrics = config["connectors"]["span_metrics"]
    dims = {d["name"] for d in span_metrics["dimensions"]}
    assert {"crew_otel.error.origin", "error.type", "gen_ai.operation.name"} <= dims
    assert span_metrics["exemplars"]["enabled"] is True
    assert span_metrics["histogram"]["unit"] == "ms"  # traces_span_metrics_duration_milliseconds
    assert span_metrics["namespace"] == "traces.span.metrics"

    prom = config["exporters"]["prometheus"]
    assert prom["enable_open_metrics"] is True
    assert "resource_to_telemetry_conversion" not in prom  # deprecated (test_assets_faults)

    policies = {p["type"]: p for p in config["processors"]["tail_sampling"]["policies"]}
    assert policies["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    booleans = [
        p["boolean_attribute"]["key"]
        for p in config["processors"]["tail_sampling"]["policies"]
        if p["type"] == "boolean_attribute" and p["boolean_attribute"]["value"] is True
    ]
    assert {"crew_otel.error.origin", "crew_otel.shared_instance"} <= set(booleans)
    resend = policies["numeric_attribute"]["numeric_attribute"]
    assert resend["key"] == "http.request.resend_count"
    assert resend["min_value"] == 1
    (condition,) = policies["ottl_condition"]["ottl_condition"]["span"]
    assert "^invoke_workflow" in condition
    assert "${env:SLOW_KICKOFF_MS:-30000}" in condition
    percentage = policies["probabilistic"]["probabilistic"]["sampling_percentage"]
    assert percentage.startswith("${env:TRACE_SAMPLE_PERCENT:-")


def test_exporters_batch_in_sending_queue() -> None:
    for name in ("otelcol-config.yaml", "gateway.yaml", "agent.yaml"):
        config = load_yaml(COLLECTOR_DIR / name)
        for cid, exporter in config["exporters"].items():
            if component_type(cid) in {"otlp_grpc", "otlp_http"}:
                assert "batch" in exporter["sending_queue"], f"{name}: {cid}"
        for pipeline in config["service"]["pipelines"].values():
            assert "batch" not in pipeline.get("processors", [])


def test_agent_routes_traces_by_trace_id() -> None:
    config = load_yaml(COLLECTOR_DIR / "agent.yaml")
    lb = config["exporters"]["load_balancing"]
    assert lb["routing_key"] == "traceID"
    assert set(lb["resolver"]) & {"dns", "static", "k8s"}
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["load_balancing"]
    assert "metrics" in pipelines


def test_jaeger_config_pipeline_graph() -> None:
    config = load_yaml(COLLECTOR_DIR / "jaeger" / "config.yaml")
    check_pipeline_graph(config)
    backends = config["extensions"]["jaeger_storage"]["metric_backends"]
    (prom,) = (b["prometheus"] for b in backends.values())
    assert prom["endpoint"] == "http://prometheus:9090"


def test_otelcol_validate_when_available(tmp_path: Path) -> None:
    """Extra check on top of the structural ones: `otelcol-contrib validate`, where the binary
    is installed (CI may not have it; the structural tests above always run)."""
    binary = shutil.which("otelcol-contrib")
    if binary is None:
        return
    env = {**os.environ, "CREW_OTEL_TRACE_FILE": str(tmp_path / "traces.jsonl")}
    for files in COLLECTOR_CONFIGS.values():
        args = [binary, "validate"]
        for name in files:
            args += ["--config", str(COLLECTOR_DIR / name)]
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=120, check=False, env=env
        )
        assert result.returncode == 0, f"{files}: {result.stdout}{result.stderr}"


# --- compose -------------------------------------------------------------------------------

COMPOSE_FILES = ["compose.yaml", "compose.file-export.yaml"]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_matches_compose_spec(name: str) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text("utf-8"))
    # The schema declares draft-07 ("$schema": "https://json-schema.org/draft-07/schema").
    validator_cls = jsonschema.Draft7Validator
    validator_cls.check_schema(schema)
    errors = sorted(
        validator_cls(schema).iter_errors(load_yaml(COLLECTOR_DIR / name)), key=lambda e: e.path
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_ports_bind_localhost(name: str) -> None:
    for service_name, service in load_yaml(COLLECTOR_DIR / name)["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (service_name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (service_name, port)


def test_compose_stack() -> None:
    compose = load_yaml(COLLECTOR_DIR / "compose.yaml")
    services = compose["services"]
    assert {"otel-collector", "jaeger", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo, f"{name}: pin {image}"
        assert tag != "latest", f"{name}: pin {image}"
        assert re.search(r"\d", tag), f"{name}: pin {image}"
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    published = {p.rsplit(":", 1)[-1] for p in services["otel-collector"]["ports"]}
    assert {"4317", "4318"} <= published
    prometheus = services["prometheus"]
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    assert any("alerts.yml" in v for v in prometheus["volumes"])
    grafana_volumes = " ".join(services["grafana"]["volumes"])
    assert "../dashboards" in grafana_volumes
    assert "provisioning" in grafana_volumes


def test_grafana_provisioning() -> None:
    provisioning = COLLECTOR_DIR / "grafana" / "provisioning"
    sources = load_yaml(provisioning / "datasources" / "datasources.yaml")["datasources"]
    by_uid = {s["uid"]: s for s in sources}
    assert by_uid["prometheus"]["type"] == "prometheus"
    assert by_uid["jaeger"]["type"] == "jaeger"
    assert by_uid["alertmanager"]["type"] == "alertmanager"
    (destination,) = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == {**destination, "name": "trace_id", "datasourceUid": "jaeger"}
    (provider,) = load_yaml(provisioning / "dashboards" / "dashboards.yaml")["providers"]
    grafana = load_yaml(COLLECTOR_DIR / "compose.yaml")["services"]["grafana"]
    assert f"../dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


SECRET_KEY = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY)", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?\?[^}]*)?\}$")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_commits_no_password(name: str) -> None:
    for service_name, service in load_yaml(COLLECTOR_DIR / name)["services"].items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            if SECRET_KEY.search(key):
                assert ENV_REFERENCE.match(str(value)), (
                    f"{service_name}: {key} must come from the environment (${{VAR:?...}})"
                )
    if name == "compose.yaml":
        grafana_env = load_yaml(COLLECTOR_DIR / name)["services"]["grafana"]["environment"]
        assert ":?" in grafana_env["GF_SECURITY_ADMIN_PASSWORD"]


def test_no_literal_secrets_in_collector_files() -> None:
    literal = re.compile(
        r"^\s*[\w.-]*(password|passwd|secret|token)[\w.-]*\s*:\s*(?P<value>\S.*)$", re.IGNORECASE
    )
    for path in sorted(COLLECTOR_DIR.rglob("*")):
        if path.suffix not in {".yaml", ".yml", ".json"}:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            match = literal.match(line)
            if match:
                value = match.group("value").strip().strip("'\"")
                assert value.startswith("${") or value.startswith("/"), (
                    f"{path.relative_to(ROOT)}:{number}: literal secret {line.strip()!r}"
                )


# --- dashboards ----------------------------------------------------------------------------


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "crew_otel_dashboard_generator", DASHBOARD_DIR / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboards_are_up_to_date() -> None:
    generated = load_generator().build_all()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in dashboard_files()}
    assert set(on_disk) == set(generated), "dashboards/*.json differ from the generator's list"
    stale = [name for name, text in generated.items() if on_disk[name] != text]
    assert not stale, f"run `python dashboards/generate.py`; out of date: {stale}"


DASHBOARDS = {path.name: load_dashboard(path) for path in dashboard_files()}


def test_expected_dashboards() -> None:
    assert set(DASHBOARDS) == {
        "crew-otel-overlap.json",
        "crew-otel-retries.json",
        "crew-otel-error-origins.json",
        "crew-otel-latency.json",
        "crew-otel-shared-instances.json",
    }
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_panels_query_prometheus(name: str) -> None:
    dashboard = DASHBOARDS[name]
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in iter_panels(dashboard) if p["type"] != "row"]
    assert panels
    for panel in panels:
        where = f"{name}: panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel.get("targets", [])
        assert any(t.get("expr", "").strip() for t in targets), f"{where}: no query"
        # Which targets request exemplars: test_assets_faults.py (only kept traces).


def test_dashboards_link_to_jaeger_searches() -> None:
    urls = [
        urllib.parse.unquote(link["url"])
        for dashboard in DASHBOARDS.values()
        for panel in iter_panels(dashboard)
        for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])
    ]
    text = "\n".join(urls)
    for tag in (
        '"crew_otel.error.origin":"true"',
        '"crew_otel.shared_instance":"true"',
        '"crew_otel.crosstalk":"true"',
        '"crew_otel.failure.cause":"${__field.labels.crew_otel_failure_cause',
    ):
        assert tag in text, f"no Jaeger UI link searching {tag}"
    for tag in (
        "crew_otel.error.origin=true",
        "crew_otel.shared_instance=true",
        "crew_otel.crosstalk=true",
        "crew_otel.failure.cause=${__field.labels.crew_otel_failure_cause",
    ):
        assert tag in text, f"no Explore link searching {tag}"
    assert "crew_otel.request.id" in text
    assert any(url.startswith("${jaeger_url}/search?") for url in urls)
    assert any(url.startswith("/explore?") for url in urls)


def test_error_origins_dashboard_says_why_requests_failed() -> None:
    """Failed runs by cause over time and the top causes now, each series linked to the Jaeger
    search of its cause."""
    dashboard = DASHBOARDS["crew-otel-error-origins.json"]
    panels = list(iter_panels(dashboard))
    assert any(p["type"] == "row" and p["title"] == "Why requests failed" for p in panels)
    by_cause = [
        p
        for p in panels
        if any(
            "crew_otel_failures_total" in t.get("expr", "")
            and f"by (job, {FAILURE_CAUSE_LABEL})" in t.get("expr", "")
            for t in p.get("targets", [])
        )
    ]
    kinds = {p["type"] for p in by_cause}
    assert "timeseries" in kinds
    assert kinds & {"stat", "bargauge"}
    for panel in by_cause:
        (target,) = panel["targets"]
        if panel["type"] == "timeseries":
            assert target["expr"].startswith(f"sum by (job, {FAILURE_CAUSE_LABEL}) (rate(")
        else:
            assert target["instant"] is True
            assert target["expr"].startswith("sort_desc(")
        links = " ".join(urllib.parse.unquote(link["url"]) for link in panel_links(panel))
        assert '"crew_otel.failure.cause":"${__field.labels.crew_otel_failure_cause' in links
        assert "service=${__field.labels.job" in links


def panel_links(panel: dict[str, Any]) -> list[dict[str, Any]]:
    return list(panel.get("fieldConfig", {}).get("defaults", {}).get("links", []))


# --- metric names --------------------------------------------------------------------------


def test_promql_expressions_cover_dashboards_and_rules() -> None:
    sources = [source for source, _ in promql_expressions()]
    assert any(s.startswith("dashboards/") for s in sources)
    assert any(s.startswith("collector/prometheus/alerts.yml") for s in sources)
    for _, expr in promql_expressions():
        # Only label_replace's regex group references ($1) remain.
        assert re.search(r"\$(?!\d)", expr) is None, expr


def test_metric_names_tokenizer() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (job, le) (rate(x_bucket{job=~"$job"}[$__rate_interval])))'
    ) == {"x_bucket"}
    assert metric_names(
        "sum by (job) (a_total) / on (job) group_left () b_count offset 5m > bool 0"
    ) == {"a_total", "b_count"}
    assert metric_names("vector(16)") == set()
    assert metric_names('topk(10, sum without (le) (rate(c{error_type!=""}[1h])))') == {"c"}


@pytest.mark.parametrize(("source", "expr"), promql_expressions(), ids=lambda v: v[:60])
def test_metric_names_are_emitted(source: str, expr: str) -> None:
    allowed = EMITTED_METRIC_NAMES | recording_rule_names()
    unknown = metric_names(expr) - allowed
    assert not unknown, f"{source}: metric names not emitted by crew_otel: {sorted(unknown)}"
