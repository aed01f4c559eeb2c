"""Every Python snippet of the README and of ``docs/`` runs as written; every link resolves.

Each ```python block of README.md and docs/*.md is run in a fresh interpreter after a short
prelude that supplies what the pages leave to the reader (a FastAPI ``app``, a ``Ticket`` model,
``build_crew()`` and ``crew`` talking to the loopback provider), followed by a check of what the
snippet promises. A block this file does not know yet still has to run without error, so no
snippet can break silently.

Every link between these files (relative, in-page anchors, and the README's absolute links into
the repository, which it uses because it is also the package's description on PyPI) must point
to a file and heading that exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from crew_otel.context import MAX_REQUEST_ID_LENGTH

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The README is also the PyPI page, where relative links do not resolve: it links into the
# repository (pyproject's Homepage) instead, and those links are checked against this tree.
REPOSITORY_URL = re.compile(r"https://github\.com/crew-otel/crew-otel/(?:blob|tree)/main/([^#]*)")

PRELUDE = """
from crew_otel.testing.crews import make_llm, prepare_offline_environment, research_crew

prepare_offline_environment()

import logging
import os

from fastapi import FastAPI, Header
from pydantic import BaseModel

import crew_otel
from crew_otel.testing import Fault

BASE_URL = os.environ["README_PROVIDER_URL"]
app = FastAPI()


class Ticket(BaseModel):
    topic: str


def build_crew(base_url: str = BASE_URL):
    return research_crew(lambda: make_llm(base_url))


crew = build_crew()
inputs = {"topic": "[[readme]]"}
"""

HANDLER_CHECK = """
import json
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

memory = InMemorySpanExporter()
trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(memory))
client = TestClient(app)
cases = {
    "none": None,
    "empty": "",
    "blank": "   ",
    "long": "r" * 10_000,
    "latin1": b"\\xff\\xfe-id",
    "plain": "client-id-7",
}


def send(item):
    name, value = item
    headers = {} if value is None else {"X-Request-ID": value}
    response = client.post("/tickets", json={"topic": f"[[{name}]]"}, headers=headers)
    return name, response.status_code, response.text


with ThreadPoolExecutor(max_workers=len(cases)) as pool:
    results = list(pool.map(send, cases.items()))
roots = [s for s in memory.get_finished_spans() if s.name.startswith("invoke_workflow")]
print(json.dumps({
    "results": results,
    "request_ids": sorted(s.attributes["crew_otel.request.id"] for s in roots),
}))
"""

LOGS_CHECK = """
from opentelemetry.sdk.trace import TracerProvider

crew_otel.instrument(tracer_provider=TracerProvider())
with crew_otel.request("readme-logs"):
    logging.getLogger("support").warning("inside the request")
    build_crew().kickoff(inputs=inputs)
logging.getLogger("support").warning("outside")
"""

PROMETHEUS_CHECK = """
import urllib.request

build_crew().kickoff(inputs=inputs)
body = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10).read().decode()
names = sorted({line.split("{")[0].split(" ")[0] for line in body.splitlines() if line[:1] != "#"})
assert "gen_ai_client_operation_duration_seconds_count" in names, names
assert "crew_otel_kickoffs_active" in names, names
print("scraped")
"""


LIFESPAN_CHECK = """
import time

from fastapi.testclient import TestClient

with TestClient(app):
    build_crew().kickoff(inputs=inputs)
started = time.monotonic()
print("shut down", telemetry.flush(), round(time.monotonic() - started, 1))
"""


def documents() -> list[Path]:
    """The README and every page of ``docs/``."""
    return [README, *sorted(DOCS.glob("*.md"))]


def python_blocks() -> list[str]:
    return [block for _, block in _located_python_blocks()]


def _located_python_blocks() -> list[tuple[str, str]]:
    """Each ```python block with ``file:index`` (its test id)."""
    located = []
    for document in documents():
        blocks = re.findall(r"```python\n(.*?)```", document.read_text(encoding="utf-8"), re.S)
        name = document.relative_to(ROOT).as_posix()
        located += [(f"{name}:{index}", block) for index, block in enumerate(blocks)]
    return located


def _kind(block: str) -> str:
    if "def test_" in block:
        return "pytest"
    if "@app.post" in block:
        return "handler"
    if "PrometheusMetricReader" in block:
        return "prometheus"
    if "crew_otel.logs.install()" in block:
        return "logs"
    if "lifespan" in block:
        return "lifespan"
    return "other"


def _environment(base_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        README_PROVIDER_URL=base_url,
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        PYTHONPATH=str(ROOT),
    )
    return env


def _run(source: str, base_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "snippet.py"
    script.write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_environment(base_url),
        cwd=tmp_path,
        check=False,
    )


def test_readme_has_the_snippets_this_file_checks() -> None:
    kinds = sorted(_kind(b) for b in python_blocks())
    assert {"handler", "lifespan", "logs", "prometheus", "pytest"} <= set(kinds), kinds


@pytest.mark.parametrize(
    "block",
    [block for _, block in _located_python_blocks()],
    ids=[i for i, _ in _located_python_blocks()],
)
def test_readme_snippet_runs_as_written(block: str, fake_provider, tmp_path: Path) -> None:
    kind = _kind(block)
    if kind == "pytest":
        test_file = tmp_path / "test_snippet.py"
        test_file.write_text(PRELUDE + "\n" + block, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
            capture_output=True,
            text=True,
            timeout=240,
            env=_environment(fake_provider.base_url),
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "1 passed" in done.stdout
        return
    check = {
        "handler": HANDLER_CHECK,
        "logs": LOGS_CHECK,
        "prometheus": PROMETHEUS_CHECK,
        "lifespan": LIFESPAN_CHECK,
    }.get(kind, "")
    source = PRELUDE + "\n" + block + "\n" + textwrap.dedent(check)
    # the Prometheus snippet binds a fixed port: one such run at a time on this machine
    guard = _machine_wide_lock("prometheus") if kind == "prometheus" else contextlib.nullcontext()
    with guard:
        done = _run(source, fake_provider.base_url, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if kind == "handler":
        _check_handler(json.loads(done.stdout.strip().splitlines()[-1]))
    elif kind == "logs":
        inside = [line for line in done.stderr.splitlines() if "inside the request" in line]
        outside = [line for line in done.stderr.splitlines() if "outside" in line]
        assert inside, done.stderr[-2000:]
        assert "[readme-logs " in inside[0]
        assert outside
        assert "[- -]" in outside[0]
    elif kind == "prometheus":
        assert "scraped" in done.stdout
    elif kind == "lifespan":
        assert "shut down" in done.stdout, done.stderr[-2000:]


@contextlib.contextmanager
def _machine_wide_lock(name: str) -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / f"crew-otel-readme-{name}.lock"
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_handler(report: dict[str, list]) -> None:
    """Hostile ``X-Request-ID`` headers: every request answered, each with a usable ID."""
    statuses = {name: status for name, status, _ in report["results"]}
    assert statuses == dict.fromkeys(statuses, 200), report["results"]
    for name, _, body in report["results"]:
        assert f"[[{name}]]" in body
    ids = report["request_ids"]
    assert len(ids) == 6, ids
    generated = [i for i in ids if re.fullmatch(r"[0-9a-f]{16}", i)]
    assert len(generated) == 3, ids  # no header, empty, blank
    assert "r" * MAX_REQUEST_ID_LENGTH in ids
    assert "client-id-7" in ids
    # the non-UTF-8 header arrives as whatever the server decoded it to: printable, kept
    rest = [i for i in ids if i not in generated and i != "client-id-7" and not i.startswith("rr")]
    assert len(rest) == 1, ids
    assert rest[0].endswith("-id")
    assert rest[0].isprintable()


def test_every_link_resolves() -> None:
    """Relative links, in-page anchors and links into the repository name a file and heading."""
    broken = [problem for document in documents() for problem in link_problems(document)]
    assert broken == []


def test_readme_links_work_on_pypi() -> None:
    """PyPI renders README.md on its own: a link there is an in-page anchor or absolute."""
    relative = [
        target
        for target in _link_targets(README.read_text(encoding="utf-8"))
        if not target.startswith(("#", "https://", "http://", "mailto:"))
    ]
    assert relative == []


def test_link_check_catches_a_missing_file_heading_or_reference(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Cross-talk: a `run`'s data\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#cross-talk-a-runs-data) [ok](#page) [ok][ref]\n"
        "[no file](missing.md) [no heading](other.md#performance) [no anchor](#nowhere)\n"
        "[undefined][nobody] `[in code](missing-too.md)`\n\n"
        "```text\n[in a fence](missing-as-well.md)\n```\n\n[ref]: other.md\n"
    )
    assert link_problems(page, root=tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#performance (no such heading)",
        "page.md: #nowhere (no such heading)",
        "page.md: [nobody] (no such reference)",
    ]


def link_problems(document: Path, root: Path = ROOT) -> list[str]:
    """The links of ``document`` that point nowhere, as ``file: target (reason)``."""
    text = document.read_text(encoding="utf-8")
    name = document.relative_to(root).as_posix()
    problems = [
        f"{name}: {target} ({why})"
        for target in _link_targets(text)
        if (why := _unresolved(document, target, root))
    ]
    defined = {label.lower() for label, _ in _REFERENCE_DEFINITION.findall(_prose(text))}
    used = _REFERENCE_USE.findall(_prose(text))
    problems += [
        f"{name}: [{label}] (no such reference)" for label in used if label.lower() not in defined
    ]
    return problems


_INLINE_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_REFERENCE_DEFINITION = re.compile(r"^\[([^\]]+)\]:\s*(\S+)", re.M)
_REFERENCE_USE = re.compile(r"\]\[([^\]]+)\]")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans, where nothing is a link."""
    without_fences = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", without_fences)


def _link_targets(text: str) -> list[str]:
    prose = _prose(text)
    return _INLINE_LINK.findall(prose) + [
        target for _, target in _REFERENCE_DEFINITION.findall(prose)
    ]


def _unresolved(document: Path, target: str, root: Path) -> str:
    """Why ``target`` (a link in ``document``) points nowhere; empty when it resolves."""
    in_repository = REPOSITORY_URL.match(target)
    if in_repository:
        path, _, anchor = target.partition("#")
        file = root / in_repository.group(1)
    elif target.startswith(("https://", "http://", "mailto:")):
        return ""
    else:
        path, _, anchor = target.partition("#")
        file = (document.parent / path) if path else document
    if not file.exists():
        return "no such file"
    if anchor and (file.suffix != ".md" or anchor not in _heading_anchors(file)):
        return "no such heading"
    return ""


def _heading_anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown`` (``-1``, ``-2`` for repeats)."""
    anchors: set[str] = set()
    prose = re.sub(r"^```.*?^```", "", markdown.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, repeat = slug, 0
        while candidate in anchors:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        anchors.add(candidate)
    return anchors
