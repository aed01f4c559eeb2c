"""``crew-otel report`` on a trace file a crashed writer left, with bad lines, and streamed.

The spans come from real crews run concurrently against the loopback provider, instrumented by
crew_otel, written one OTLP/JSON line per span (what ``OTLPJsonFileExporter`` under a
``SimpleSpanProcessor`` writes). A line cut off (a crash, a full disk, a copy of a live file)
or corrupt anywhere is skipped and named on stderr by number, never by content; the report
covers the rest, exactly as if the line had never been written. Exit status 2 only when
nothing usable was read.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest

from benchmarks.trace_report import multiply, recording_duration_ns
from crew_otel.cli.main import main
from crew_otel.otlp_json import SpanRecord, encode
from tests.workloads import mixed_workload

NOT_JSON = "not valid JSON (truncated or corrupt?)"
SECRET = "sk-SECRET-do-not-print"


@pytest.fixture
def span_lines(otel: Any, fake_provider: Any) -> list[str]:
    """One OTLP/JSON line per span of a concurrent mixed workload (failures, retries, a
    shared agent), in the order the spans ended."""
    mixed_workload(fake_provider)
    spans = otel.get_finished_spans()
    assert len(spans) > 40
    return [json.dumps(encode([span]), separators=(",", ":")) for span in spans]


def write(path: Path, lines: list[str | bytes], newline_at_end: bool = True) -> Path:
    data = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines)
    path.write_bytes(data + (b"\n" if newline_at_end else b""))
    return path


def report(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, dict[str, Any]]:
    """``crew-otel report FILE --summary-json``: exit status, stderr, the figures."""
    capsys.readouterr()
    figures = path.with_suffix(".summary.json")
    figures.unlink(missing_ok=True)
    code = main(["report", str(path), "--summary-json", str(figures)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert SECRET not in captured.out + captured.err
    return code, captured.err, json.loads(figures.read_text()) if figures.exists() else {}


def test_a_cut_off_last_line_is_skipped_and_the_rest_reported(span_lines, tmp_path, capsys):
    complete = write(tmp_path / "complete.jsonl", span_lines[:-1])
    last = span_lines[-1]
    crashed = write(
        tmp_path / "crashed.jsonl",
        [*span_lines[:-1], last[: len(last) // 2]],
        newline_at_end=False,
    )
    code, errors, expected = report(complete, capsys)
    assert (code, errors) == (0, "")

    code, errors, figures = report(crashed, capsys)
    n = len(span_lines)
    assert code == 0
    assert errors == (
        f"crew-otel report: warning: {crashed}: skipped 1 of {n} lines, the report covers the "
        f"rest: {NOT_JSON} at line {n}\n"
    )
    assert figures == expected
    assert last[len(last) // 4 : len(last) // 2] not in errors  # no content of the line


def test_bad_lines_in_the_middle_are_skipped_by_number_never_by_content(
    span_lines, tmp_path, capsys
):
    clean = write(tmp_path / "clean.jsonl", span_lines)
    _, _, expected = report(clean, capsys)
    hostile_id = json.dumps(
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": SECRET, "spanId": "1"}]}]}]}
    )
    lines: list[str | bytes] = list(span_lines)
    lines.insert(4, '{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "' + SECRET)
    lines.insert(9, hostile_id)
    lines.insert(14, b"\x00\x00\xff" + SECRET.encode())
    lines.insert(20, "")  # blank lines are not lines of data
    damaged = write(tmp_path / "damaged.jsonl", lines)

    code, errors, figures = report(damaged, capsys)
    assert code == 0
    assert errors == (
        f"crew-otel report: warning: {damaged}: skipped 3 of {len(span_lines) + 3} lines, the "
        f"report covers the rest: {NOT_JSON} at line 5; invalid trace ID at line 10; binary "
        "data, not UTF-8 text at line 15\n"
    )
    assert figures == expected


def test_a_file_with_nothing_usable_exits_2_naming_the_first_lines(tmp_path, capsys):
    empty = write(tmp_path / "empty.jsonl", [], newline_at_end=False)
    code, errors, figures = report(empty, capsys)
    assert (code, figures) == (2, {})
    assert errors == f"crew-otel report: error: {empty}: empty file, no spans\n"

    garbage = write(
        tmp_path / "garbage.jsonl",
        [f"{SECRET} {i}" for i in range(12)] + ['{"resourceMetrics": []}'] * 13,
    )
    code, errors, figures = report(garbage, capsys)
    assert (code, figures) == (2, {})
    numbers = ", ".join(str(n) for n in range(1, 11))
    assert errors == (
        f"crew-otel report: error: {garbage}: no usable spans, skipped 25 of 25 lines: "
        f"{NOT_JSON} at lines {numbers}; and 15 more lines\n"
    )


def test_report_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status 0: the report was printed" in text
    assert "exit status 2: nothing usable" in text


# --- streaming -------------------------------------------------------------------------------
MINUTE = 60 * 1_000_000_000


def test_finished_traces_are_not_held_and_the_figures_are_unchanged(span_lines, tmp_path):
    """Copies of the workload 10 minutes apart (fresh IDs): the analysis drops each trace
    once it is complete, so it never holds more than a bounded window of spans, and its figures
    are those of holding everything to the end."""
    from crew_otel.otlp_json import ReadLog, iter_file
    from crew_otel.report.analysis import Analysis, summary

    copies = 30
    duration = recording_duration_ns(span_lines)
    assert duration < 5 * MINUTE
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(multiply(span_lines, range(copies), 10 * MINUTE)) + "\n")
    total = copies * len(span_lines)

    streaming, holding = Analysis(), Analysis(settle_s=float("inf"))
    alive: list[weakref.ref[SpanRecord]] = []
    for span in iter_file(path, ReadLog(str(path))):
        streaming.add(span)
        holding.add(span)
        alive.append(weakref.ref(span))
        del span
    gc.collect()
    assert [ref for ref in alive if ref() is not None] == []  # no input record is kept

    assert holding.peak_held_spans == total  # the counter counts what is held
    assert streaming.peak_held_spans <= 2 * len(span_lines)
    assert summary(streaming.reports()) == summary(holding.reports())
