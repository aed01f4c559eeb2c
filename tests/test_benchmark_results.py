"""The committed performance figures are what the benchmarks said.

``make bench`` writes the raw results (not in git) and renders ``benchmarks/results/summary.md``
from them (``python -m benchmarks.report``); every ratio quoted in docs/performance.md must
appear in that summary: no figure is typed in by hand or left behind by a newer run.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _performance_section() -> str:
    return (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")


def test_readme_ratios_come_from_the_committed_summary():
    summary = (RESULTS / "summary.md").read_text(encoding="utf-8")
    quoted = re.findall(r"\b\d\.\d{3} x", _performance_section())
    assert quoted, "the README quotes the end-to-end ratios"
    missing = [ratio for ratio in quoted if ratio not in summary]
    assert missing == [], f"README ratios not in benchmarks/results/summary.md: {missing}"


def test_the_per_hook_benchmark_still_drives_every_wrapper(tmp_path):
    """The benchmark builds the wrappers the way the instrumentor does: a change to their
    constructors or scopes must not leave ``make bench`` broken until the next run."""
    import json

    from benchmarks.hooks import HOOKS

    out = tmp_path / "hooks.json"
    _run_module("benchmarks.hooks", "--smoke", "-o", str(out))
    results = json.loads(out.read_text())["benchmarks"]
    assert set(HOOKS) <= set(results)
    for name in HOOKS:
        assert results[name]["value"] > 0, name
        assert results[name]["spans_per_call"] >= 1, (name, results[name])


def test_the_cold_calls_time_every_hook_and_the_report_sets_them_beside_the_loops(tmp_path):
    """``benchmarks.hooks --cold`` times every benchmark one call at a time, hot and after the
    caches were flushed; the per-hook table shows both beside pyperf's loop figures, each net
    of a plain call, the cold ones also against a cold bare span."""
    import json

    from benchmarks import report
    from benchmarks.hooks import NAMES

    out = tmp_path / "hooks-cold.json"
    _run_module("benchmarks.hooks", "--cold", str(out), "--calls", "3")
    cold = json.loads(out.read_text())
    assert cold["calls"] == 3
    assert set(cold["benchmarks"]) == set(NAMES)
    for name, value in cold["benchmarks"].items():
        assert value["cold"] > 0, name
        assert value["hot"] > 0, name

    loops = {name: {"median": 1e-5 * (i + 1), "tool": "pyperf"} for i, name in enumerate(NAMES)}
    lines, _ = report._render_hooks(loops, 0.0, cold)
    assert lines[2].endswith("| cold x cold bare SDK span |")
    measured = cold["benchmarks"]
    bare, span, model = measured["bare call"], measured["SDK span"], measured["model call"]
    row = next(line for line in lines if line.startswith("| model call |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3] == f"{(model['hot'] - bare['hot']) * 1e6:.1f}"
    assert cells[4] == f"{(model['cold'] - bare['cold']) * 1e6:.1f}"
    ratio = (model["cold"] - bare["cold"]) / (span["cold"] - bare["cold"])
    assert cells[5] == f"{ratio:.2f}"
    lines, _ = report._render_hooks(loops, 0.0, None)
    assert lines[2] == "| hook | µs / call | x bare SDK span |", "no cold file: no cold columns"


def test_the_sdk_floor_makes_crew_otels_spans_and_points_again(tmp_path, fake_provider):
    """The SDK floor variant of ``make bench`` captures one kickoff's spans and metric points
    with crew_otel (in a process of its own) and makes the same ones with the bare SDK: the
    same names, kinds, nesting and attributes, and the same number of histogram points."""
    import json

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from benchmarks import floor

    template_path = tmp_path / "template.json"
    _run_module(
        "benchmarks.floor", "--capture", str(template_path), "--base-url", fake_provider.base_url
    )
    template = json.loads(template_path.read_text())
    names = [span["name"] for span in template["spans"]]
    assert names[0].startswith("invoke_workflow")
    assert sum(name.startswith("chat") for name in names) == 3
    assert sum(name == "POST" for name in names) == 3, "the HTTP attempts are part of it"
    assert any(p["name"] == "gen_ai.client.token.usage" for p in template["points"])

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    replay = floor.Replay(template, tracer_provider, MeterProvider(metric_readers=[reader]))
    replay()
    made = spans.get_finished_spans()
    by_id = {span.context.span_id: span for span in made}
    assert sorted(span.name for span in made) == sorted(names)
    for span in made:
        original = next(
            t
            for t in template["spans"]
            if t["name"] == span.name and t["attributes"] == floor._attrs(span.attributes)
        )
        parent = by_id.get(span.parent.span_id) if span.parent is not None else None
        expected_parent = original["parent"]
        if expected_parent is None:
            assert parent is None
        else:
            assert parent is not None
            assert parent.name == template["spans"][expected_parent]["name"]
    recorded = {
        (metric.name, json.dumps(floor._attrs(point.attributes), sort_keys=True)): point.count
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if hasattr(point, "count")  # histograms (counters: one add each, not counted here)
    }
    expected = {
        (p["name"], json.dumps(p["attributes"], sort_keys=True)): p["times"]
        for p in template["points"]
        if p["kind"] == "histogram"
    }
    assert recorded == expected

    # In place: the same spans and points, made around the calls a run makes them for.
    made = json.loads(
        _run_module(
            "benchmarks.floor",
            "--made-in-place",
            str(template_path),
            "--base-url",
            fake_provider.base_url,
        )
    )
    assert sorted(name for name, _ in made["spans"]) == sorted(names)
    parents = dict(made["spans"])
    assert parents[names[0]] is None, "the workflow span is the root"
    assert all(parent is not None for name, parent in made["spans"] if name != names[0])
    for name, parent in made["spans"]:
        if name.startswith("chat"):
            assert parent.startswith("crewai.agent.step"), (name, parent)
        if name == "POST":
            assert parent.startswith("chat"), (name, parent)
    in_place = {
        (name, json.dumps(attributes, sort_keys=True)): count
        for name, attributes, count in made["points"]
    }
    assert in_place == expected


def _run_module(module: str, *args: str) -> str:
    """``python -m module args`` from the repository root; it must succeed. Its stdout."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_collector_meter_counts_what_the_collector_did_and_the_report_shows_it():
    """The end-to-end rounds count the garbage collector's collections, the CPU they took
    and the objects they freed, beside the kernel's page faults and context switches; the
    report shows them per kickoff, with each variant's difference to the uninstrumented one."""
    import gc
    import resource

    from benchmarks import common, report, worker

    def cycles(n: int) -> None:
        for _ in range(n):
            node: list[object] = []
            node.append(node)  # only the collector frees it

    rows = []
    for variant, garbage in ((common.BASELINE, 1000), (common.CREW_OTEL, 3000)):
        before = resource.getrusage(resource.RUSAGE_SELF)
        with worker.CollectorMeter() as meter:
            cycles(garbage)
            gc.collect()
        after = resource.getrusage(resource.RUSAGE_SELF)
        assert meter.collections[2] >= 1, "the explicit full collection is counted"
        assert meter.collected >= garbage
        assert meter.cpu > 0
        rows.append(
            {
                "variant": variant,
                "process": worker.process_counters(2, meter, before, after),
                "user": (after.ru_utime - before.ru_utime) / 2,
                "sys": (after.ru_stime - before.ru_stime) / 2,
            }
        )
    assert gc.callbacks.count(meter._callback) == 0, "the meter removes its callback"
    freed = [row["process"]["gc_collected"] for row in rows]
    lines = report._render_process(rows, [common.BASELINE, common.CREW_OTEL])
    line = next(x for x in lines if x.startswith("| objects the collector freed"))
    assert line == (
        f"| objects the collector freed | {freed[0]:.0f} | {freed[1]:.0f} "
        f"({freed[1] - freed[0]:+.0f}) |"
    )
    assert any(x.startswith("| minor page faults |") for x in lines)
    kernel = next(x for x in lines if x.startswith("| CPU in the kernel"))
    assert kernel.count("|") == 4, "user and kernel CPU shown for both variants"
    del rows[0]["sys"]  # rounds recorded before the split: the row is left out, not made up
    lines = report._render_process(rows, [common.BASELINE, common.CREW_OTEL])
    assert not any(x.startswith("| CPU in the kernel") for x in lines)
    assert any(x.startswith("| CPU in user space") for x in lines)


def test_code_outside_tool_calls_is_judged_by_its_instructions_when_they_are_counted():
    """CPU time on a shared machine moves more than the wrappers cost (the control that
    nothing wrapped touches moved most): with instruction counts, the outside-runs target is
    decided by them, each state against the uninstrumented one; without, by CPU time."""
    from benchmarks import detectors, report

    cpu = {
        f"{op}: {state}": {
            "median": 1e-5 * (1.5 if op == "deepcopy" else 1.0),
            "stdev": 0.0,
            "tool": "pyperf",
        }
        for op in detectors.OPERATIONS
        for state in detectors.STATES
    }
    # the control read 1.5 x in CPU time in the two instrumented states, nothing else moved
    for state in (detectors.NONE, detectors.OFF):
        cpu[f"deepcopy: {state}"]["median"] = 1e-5
    counts = {name: 10_000.0 for name in cpu}
    lines, (_, text, status) = report._render_outside(cpu, 0.0, counts)
    assert status == "met", "the control's CPU time does not decide when instructions are counted"
    assert text.startswith("instructions")
    assert any(line.startswith("| open+close | 10,000 |") for line in lines)

    counts["open+close: detectors on"] = 10_500.0  # the wrapper's cost: 5 % of the call
    _, (_, text, status) = report._render_outside(cpu, 0.0, counts)
    assert status == "**missed**"
    assert "open+close 1.050 x (+500)" in text
    assert "open+close (detectors on)" in text

    _, (_, text, status) = report._render_outside(cpu, 0.0, None)
    assert status == "**missed**", "CPU time decides"
    assert "deepcopy (detectors on)" in text


def test_several_callgrind_processes_per_variant_are_decided_by_the_median_one():
    """Processes of one variant can differ by more than two variants do: with several per
    variant, the verdict on added instructions is the median process's, each one listed."""
    from benchmarks import common, instructions, report

    def process(*per_kickoff: float, full_gc_in_last: bool = False) -> dict[str, object]:
        windows = [
            {
                "kickoffs": 12,
                "per_kickoff": value * 1e6,
                "spans_per_kickoff": 15.0,
                "gc_collections": [3, 0, 1 if full_gc_in_last and i == len(per_kickoff) - 1 else 0],
            }
            for i, value in enumerate(per_kickoff)
        ]
        return {"windows": windows, "metric_collection": 1.0, "full_gc": 2.0e8}

    variants = {
        common.BASELINE: instructions.median_process([process(1000.0, 1000.2)]),
        # the last window's full collection is left out; lowest of the rest: 1016, 1014, 1019
        common.CREW_OTEL: instructions.median_process(
            [
                process(1016.0, 1030.0, full_gc_in_last=True),
                process(1014.5, 1014.0),
                process(1019.0, 1019.5),
            ]
        ),
        common.OPENLLMETRY: instructions.median_process(
            [process(1015.0), process(1013.0), process(1017.0)]
        ),
    }
    assert [len(v.get("processes", [])) for v in variants.values()] == [0, 3, 3]
    data = {"settings": {"timers": "quiet", "processes_per_variant": 3}, "variants": variants}
    added, _, _ = report._added(data, common.CREW_OTEL)
    assert round(added / 1e6, 1) == 16.0  # the median process's, not the lowest (14.0)
    theirs, _, _ = report._added(data, common.OPENLLMETRY)
    assert round(theirs / 1e6, 1) == 15.0
    target = next(t for t in report._instruction_targets(data) if "OpenLLMetry" in t[0])
    assert target[2] == "**missed**"
    line = next(x for x in report._render_instructions(data) if "callgrind processes" in x)
    assert "crew_otel 1016.0, 1014.0, 1019.0" in line


def test_the_instruction_targets_set_crew_otels_own_code_on_top_of_both_sdk_floors(tmp_path):
    """The instructions section counts the SDK floor in place beside the burst one: each gets
    a row of the targets with what crew_otel's own code adds on top of it, and a row of the
    table of variants."""
    from benchmarks import common, report, run

    def bench(no_floor: bool) -> run.Bench:
        options = dict.fromkeys(run.SETTING_OPTIONS)
        args = argparse.Namespace(
            **options, quick=True, out=str(tmp_path / str(no_floor)), only=None, no_floor=no_floor
        )
        return run.Bench(args)

    # the variants the end-to-end and instructions sections run
    with_floor, without_floor = bench(no_floor=False), bench(no_floor=True)
    try:
        assert with_floor.variants_with_floor_in_place() == [
            common.BASELINE,
            common.CREW_OTEL,
            common.SDK_FLOOR,
            common.SDK_FLOOR_IN_PLACE,
        ]
        assert without_floor.variants_with_floor_in_place() == [
            common.BASELINE,
            common.CREW_OTEL,
        ]
    finally:
        for each in (with_floor, without_floor):
            each.close()
            each.log.close()

    def entry(per_kickoff: float, spans: float) -> dict[str, object]:
        window = {
            "kickoffs": 12,
            "per_kickoff": per_kickoff * 1e6,
            "spans_per_kickoff": spans,
            "gc_collections": [3, 0, 0],
            "span_export_per_kickoff": 5.0e6,
        }
        return {"windows": [window], "metric_collection": 1.0, "full_gc": 2.0e8}

    data = {
        "settings": {"timers": "quiet", "processes_per_variant": 1},
        "variants": {
            common.BASELINE: entry(1000.0, 0.0),
            common.CREW_OTEL: entry(1015.0, 15.0),
            common.SDK_FLOOR: entry(1007.5, 15.0),
            common.SDK_FLOOR_IN_PLACE: entry(1009.0, 15.0),
        },
    }
    rows = {what: value for what, value, _ in report._instruction_targets(data)}
    burst = next(value for what, value in rows.items() if "in a burst" in what)
    in_place = next(value for what, value in rows.items() if "floor in place" in what)
    assert burst.startswith("+7.5 M")
    assert burst.endswith("on top: +7.5 M")
    assert in_place.startswith("+9.0 M")
    assert in_place.endswith("on top: +6.0 M")
    table = report._render_instructions(data)
    row = next(x for x in table if x.startswith(f"| {common.LABELS[common.SDK_FLOOR_IN_PLACE]} |"))
    assert "+9.0 M (1.009 x)" in row
    del data["variants"][common.SDK_FLOOR_IN_PLACE]  # runs from before it was counted
    assert not any("floor in place" in t[0] for t in report._instruction_targets(data))


def test_the_memory_soak_shows_the_sdk_floor_beside_crew_otel():
    """The soak's verdict compares crew_otel with the uninstrumented process; the SDK floor
    (the same spans and points exported by the bare SDK) is shown beside it, so that growth
    the exporter causes is not taken for crew_otel's own."""
    from benchmarks import common, report

    def samples(*rss_mb: float) -> dict[str, object]:
        return {
            "samples": [
                {"kickoffs": 500 * i, "rss": mb * 1e6, "objects": 1000 + i}
                for i, mb in enumerate(rss_mb)
            ]
        }

    soak = {
        "kickoffs": 1000,
        "every": 500,
        "elapsed_s": 60.0,
        "variants": {
            common.BASELINE: samples(200.0, 201.0, 201.5),
            common.CREW_OTEL: samples(210.0, 212.0, 214.0),
            common.SDK_FLOOR: samples(205.0, 206.0, 208.0),
        },
    }
    lines, targets = report._render_soak(soak)
    assert sum(line.startswith("| ") and " MB" not in line for line in lines[3:]) == 3
    verdict, floor = targets
    assert verdict[1] == "+2.0 MB vs +0.5 MB from kickoff 500 on"
    assert verdict[2] == "**missed**"
    assert floor[1] == "+2.0 MB from kickoff 500 on"
    assert floor[2] == "information"
    del soak["variants"][common.SDK_FLOOR]  # runs from before the floor was soaked
    _, targets = report._render_soak(soak)
    assert len(targets) == 1


def test_the_command_line_options_set_the_settings_and_are_named_in_the_recorded_command():
    """Every option that overrides a setting does so (a list of values as a tuple), and the
    command a partial run records names each option and flag given, so that the summary's
    header says how each section was measured."""
    import dataclasses

    from benchmarks import run

    parser_args = {name: None for name in run.SETTING_OPTIONS}
    parser_args.update(dict.fromkeys(run.FLAG_OPTIONS, False))
    args = argparse.Namespace(
        **{
            **parser_args,
            "e2e_rounds": 200,
            "instructions_windows": [12, 12],
            "instructions_processes": 5,
            "no_floor": True,
        }
    )
    settings = dataclasses.replace(run.FULL, **run._overrides(args))
    assert settings.e2e_rounds == 200
    assert settings.instructions_windows == (12, 12)
    assert settings.instructions_processes == 5
    assert settings.soak_kickoffs == run.FULL.soak_kickoffs, "an option not given changes nothing"
    assert run._command_options(args) == (
        " --e2e-rounds 200 --instructions-windows 12 12 --instructions-processes 5 --no-floor"
    )
    assert run._command_options(argparse.Namespace(**parser_args)) == ""
