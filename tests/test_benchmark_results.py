"""The committed performance figures are what the benchmarks said.

``make bench`` writes the raw results (not in git) and renders ``benchmarks/results/summary.md``
from them (``python -m benchmarks.report``); every ratio quoted in docs/performance.md must
appear in that summary: no figure is typed in by hand or left behind by a newer run.
"""

from __future__ import annotations

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
    import subprocess
    import sys

    from benchmarks.hooks import HOOKS

    out = tmp_path / "hooks.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.hooks", "--smoke", "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["benchmarks"]
    assert set(HOOKS) <= set(results)
    for name in HOOKS:
        assert results[name]["value"] > 0, name
        assert results[name]["spans_per_call"] >= 1, (name, results[name])
