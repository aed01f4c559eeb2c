"""What a pip user gets: the built wheel and sdist, installed the way users install them.

The wheel and the sdist are built once per session into a temporary directory. The checks:
the wheel's dependencies resolve with the pips that Python images ship (24.0, 25.0: their
resolver gives up on dependency sets that pip 25.1+ solves), the distributions carry
``py.typed``, the LICENSE, the Collector stack and the dashboards, a user's mypy sees the
package as typed, and ``crew-otel assets DIR`` writes the stack out of the packaged wheel.
The tests marked ``network`` need PyPI: the wheel's dependencies resolve, alone and with each
extra, with pip 24.0 and 25.0 (what Python images ship), the latest pip and uv, each in a fresh
virtualenv (``--dry-run``, all in parallel); and in a fresh virtualenv holding only the wheel
and what it pulls from PyPI (``crew-otel[demo]``, no checkout on the path), ``crew-otel demo``
runs, ``crew-otel assets DIR`` writes a stack that validates, and a FastAPI service under
``uvicorn --workers 2`` with the trace-file exporter writes one file that ``crew-otel report``
reads completely.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from crew_otel.cli.assets import ASSET_SUFFIXES, TREES
from tests.support.waiting import free_port, wait_for

#: The session keeps the real CA settings (see ``tests/conftest.py``): these tests reach PyPI.
USES_PACKAGE_REGISTRIES = True
ROOT = Path(__file__).resolve().parent.parent
#: The pips of current Python images (their resolver is resolvelib < 1.1), and PyPI's latest.
PIPS = ("24.0", "25.0", "latest")
#: Extras for contributors (the test suite, linters): installed with uv, checked with uv only.
CONTRIBUTOR_EXTRAS = frozenset({"test", "test-full", "dev"})


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel and the sdist, built from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "uv", "build", "--quiet", "--out-dir", str(out), str(ROOT)],
        check=True,
        timeout=180,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _source_assets() -> set[str]:
    """Asset files of the checkout, as the wheel should hold them (not git-ignored output)."""
    ignored = {"export"}  # collector/export/: the file exporter's output directory
    found = set()
    for tree in TREES:
        for path in (ROOT / tree).rglob("*"):
            relative = path.relative_to(ROOT)
            if (
                path.is_file()
                and path.suffix in ASSET_SUFFIXES
                and not ignored & set(relative.parts)
                and "__pycache__" not in relative.parts
            ):
                found.add(f"crew_otel/assets/{relative.as_posix()}")
    return found


def test_wheel_carries_types_license_and_assets(dists: tuple[Path, Path]) -> None:
    wheel, _ = dists
    names = _wheel_names(wheel)
    assert "crew_otel/py.typed" in names
    licenses = [n for n in names if n.split("/")[-1] == "LICENSE" and ".dist-info/" in n]
    assert licenses, "no LICENSE in the wheel"
    with zipfile.ZipFile(wheel) as archive:
        assert b"Apache License" in archive.read(licenses[0])
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        header = archive.read(metadata).decode().split("\n\n", 1)[0]
    assert "License-Expression: Apache-2.0" in header
    # pip 24.0/25.0 know core metadata up to 2.4
    assert "Metadata-Version: 2.4" in header or "Metadata-Version: 2.3" in header
    expected = _source_assets()
    assert {
        "crew_otel/assets/collector/compose.yaml",
        "crew_otel/assets/collector/otelcol-config.yaml",
        "crew_otel/assets/collector/prometheus/alerts.yml",
        "crew_otel/assets/collector/alertmanager/alertmanager.yml",
        "crew_otel/assets/dashboards/crew-otel-overlap.json",
    } <= expected
    assert expected <= names, sorted(expected - names)
    # the dashboards' Python build tooling is not shipped
    assert not [n for n in names if n.startswith("crew_otel/assets/") and n.endswith(".py")]


def test_sdist_carries_license_and_marker(dists: tuple[Path, Path]) -> None:
    _, sdist = dists
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "crew_otel/py.typed", "collector/compose.yaml"} <= names


@pytest.fixture(scope="session")
def unpacked_wheel(dists: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's files in a directory, as they sit in site-packages after an install."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(dists[0]) as archive:
        archive.extractall(target)
    return target


def test_users_mypy_sees_a_typed_package(unpacked_wheel: Path, tmp_path: Path) -> None:
    """A user's mypy, with the wheel installed in site-packages, finds the types."""
    pytest.importorskip("mypy", reason="mypy comes with the dev extra (the main environment)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python3*/site-packages")
    for item in unpacked_wheel.iterdir():
        (site / item.name).symlink_to(item)
    snippet = tmp_path / "app.py"
    snippet.write_text("import crew_otel\n\ncrew_otel.instrument()\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "--python-executable",
            str(venv / "bin" / "python"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=120,
    )
    assert "import-untyped" not in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_assets_command_from_the_wheel(unpacked_wheel: Path, tmp_path: Path) -> None:
    """``crew-otel assets DIR`` from the packaged files: the layout compose's mounts expect,
    no overwrite of a changed file without ``--force``."""
    env = {**os.environ, "PYTHONPATH": str(unpacked_wheel)}
    # cwd: not the checkout, whose crew_otel would come first on sys.path
    run = functools.partial(
        subprocess.run, env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    command = [sys.executable, "-m", "crew_otel.cli.main", "assets"]
    out = tmp_path / "stack"
    first = run([*command, str(out)])
    assert first.returncode == 0, first.stderr
    assert f"wrote {out / 'collector' / 'compose.yaml'}" in first.stdout
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    packaged = {n.removeprefix("crew_otel/assets/") for n in _source_assets()}
    assert written == packaged
    located = run(
        [sys.executable, "-c", "import crew_otel.cli.assets as a; print(a._root('collector'))"]
    ).stdout
    assert Path(located.strip()) == unpacked_wheel / "crew_otel" / "assets" / "collector"
    for dashboard in (out / "dashboards").glob("*.json"):
        assert json.loads(dashboard.read_text())["panels"]
    # compose mounts ../dashboards next to collector/
    assert "../dashboards" in (out / "collector" / "compose.yaml").read_text()

    changed = out / "collector" / "prometheus" / "alerts.yml"
    changed.write_text(changed.read_text() + "# my rule\n")
    again = run([*command, str(out)])
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert "alerts.yml" in again.stderr
    assert changed.read_text().endswith("# my rule\n")
    forced = run([*command, "--force", str(out)])
    assert forced.returncode == 0, forced.stderr
    assert not changed.read_text().endswith("# my rule\n")


# --- resolution: pip 24.0, 25.0, the latest and uv, in fresh virtualenvs ----------------------


UV_PIP_INSTALL = (sys.executable, "-m", "uv", "pip", "install")
#: Few requests, short provider latency: the demo's procedure, small.
DEMO_OPTIONS = ("--concurrency", "4", "--latency", "0.01")


def _uv(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """uv (from the test environment) with its default, shared cache."""
    return subprocess.run(
        [sys.executable, "-m", "uv", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )


def _fresh_venv(where: Path) -> Path:
    """A new virtualenv without pip (uv creates it in well under a second); its python."""
    _uv("venv", "--quiet", "--python", sys.executable, str(where), timeout=120)
    return where / "bin" / "python"


def _pip_venv(version: str, where: Path) -> Path:
    python = _fresh_venv(where)
    pip = "pip" if version == "latest" else f"pip=={version}"
    _uv("pip", "install", "--quiet", "--python", str(python), pip, timeout=180)
    return python


def _extras(wheel: Path) -> set[str]:
    """The extras the wheel's metadata declares (``Provides-Extra``)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        header = archive.read(metadata).decode().split("\n\n", 1)[0]
    return set(re.findall(r"^Provides-Extra: (\S+)$", header, re.MULTILINE))


def _run(command: list[str], timeout: float = 420) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)


@pytest.mark.network
def test_wheel_resolves_alone_and_with_each_extra(dists: tuple[Path, Path], tmp_path: Path) -> None:
    """``pip install crew-otel`` / ``crew-otel[extras]`` with pip 24.0 and 25.0 (what Python
    images ship; their resolver gave up on the bare package), the latest pip and uv, each in a
    fresh virtualenv, against PyPI (a dry run resolves only; all runs in parallel).

    Each pip resolves the bare wheel and the wheel with every user extra at once; uv (fast)
    resolves the bare wheel, each extra alone, and the contributors' extras.
    """
    wheel = dists[0]
    extras = _extras(wheel)
    assert {"crewai", "otlp", "grpc", "prometheus", "demo"} <= extras
    user_extras = sorted(extras - CONTRIBUTOR_EXTRAS)
    every_extra = f"{wheel}[{','.join(user_extras)}]"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        venvs = {v: pool.submit(_pip_venv, v, tmp_path / f"pip-{v}") for v in PIPS}
        uv_python = pool.submit(_fresh_venv, tmp_path / "uv")
        jobs: dict[str, concurrent.futures.Future[subprocess.CompletedProcess[str]]] = {}
        # the long resolutions (every extra, old pips) first; uv's take seconds
        for spec in (every_extra, str(wheel)):
            for version, venv in venvs.items():
                jobs[f"pip {version} {spec}"] = pool.submit(
                    _run, [str(venv.result()), "-m", "pip", "install", "--dry-run", spec]
                )
        for spec in [str(wheel), *(f"{wheel}[{extra}]" for extra in sorted(extras))]:
            jobs[f"uv {spec}"] = pool.submit(
                _run, [*UV_PIP_INSTALL, "--dry-run", "--python", str(uv_python.result()), spec]
            )
        results = {name: job.result() for name, job in jobs.items()}
    versions = {
        v: _run([str(tmp_path / f"pip-{v}" / "bin" / "python"), "-m", "pip", "--version"]).stdout
        for v in PIPS
    }
    assert versions["24.0"].startswith("pip 24.0 "), versions
    assert versions["25.0"].startswith("pip 25.0 "), versions
    failures = []
    for name, result in results.items():
        output = result.stdout + result.stderr
        if result.returncode != 0 or "Would install" not in output:
            failures.append(f"{name}: {textwrap.shorten(output[-3000:], 3000)}")
        elif name.startswith("pip"):
            assert "crew-otel-" in result.stdout, name
    assert not failures, "\n".join(failures)


# --- a fresh virtualenv with only the wheel: what a pip user runs ------------------------------


@pytest.fixture(scope="session")
def wheel_venv(dists: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with ``crew-otel[demo]`` from the built wheel and PyPI, and nothing
    of this checkout; its ``bin`` directory. Bytecode is compiled as ``pip install`` does (the
    demo's services start within their time limit only then)."""
    root = tmp_path_factory.mktemp("wheel-venv")
    python = _fresh_venv(root / "venv")
    _uv(
        "pip",
        "install",
        "--quiet",
        "--compile-bytecode",
        "--python",
        str(python),
        f"{dists[0]}[demo]",
    )
    return python.parent


def _user_env(tmp: Path) -> dict[str, str]:
    """The environment of a user's shell in ``tmp``: nothing of this checkout on the path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "OTEL_", "CREW_OTEL_", "CREWAI_", "PYTEST"))
    }
    return {**env, "HOME": str(tmp), "XDG_DATA_HOME": str(tmp / "xdg-data")}


@pytest.mark.network
def test_wheel_venv_has_no_checkout(wheel_venv: Path, tmp_path: Path) -> None:
    """Guard for the tests below: the venv imports crew_otel from its site-packages."""
    located = subprocess.run(
        [str(wheel_venv / "python"), "-c", "import crew_otel; print(crew_otel.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=_user_env(tmp_path),
    ).stdout
    assert Path(located).resolve().is_relative_to(wheel_venv.parent.resolve()), located
    assert not Path(located).resolve().is_relative_to(ROOT)


@pytest.mark.network
def test_demo_from_the_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    """``crew-otel demo`` (few requests) exits 0 and prints the diagnosis of every service."""
    requests = 4
    summary_path = tmp_path / "summary.json"
    options = [*DEMO_OPTIONS, "--requests", str(requests), "--summary-json", str(summary_path)]
    result = subprocess.run(
        [str(wheel_venv / "crew-otel"), "demo", *options],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**_user_env(tmp_path), "COLUMNS": "120"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for service in ("broken", "halffixed", "fixed"):
        assert f"support-api-{service}" in result.stdout
    assert "Provider saw" in result.stdout
    assert f"Clients sent {3 * requests}" in " ".join(result.stdout.split())
    services = json.loads(summary_path.read_text())["services"]
    assert len(services) == 3
    for name, figures in services.items():
        assert figures["requests"] == requests, name
        assert figures["conclusion"], name
        assert " ".join(figures["conclusion"].split()[:3]) in " ".join(result.stdout.split())


# --- crew-otel assets DIR validates -------------------------------------------------------------

COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
#: Bind-mount sources the user creates (compose.file-export.yaml says ``mkdir -p export``).
USER_CREATED = frozenset({"./export"})
CONFIG_FLAG = re.compile(r"^--config(?:\.file)?=(/\S+)$")


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def _config_paths(service: dict[str, Any]) -> list[str]:
    """The container paths a service's command reads its configuration from."""
    command = service.get("command", [])
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    paths = [m.group(1) for part in command if (m := CONFIG_FLAG.match(part))]
    paths += [value for flag, value in itertools.pairwise(command) if flag == "--config"]
    return paths


def _mounted_file(mounts: dict[str, str], path: str, compose_dir: Path) -> Path | None:
    """The host file behind container ``path``, through a mounted file or directory."""
    for target, source in mounts.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return (compose_dir / source / path[len(target) :].lstrip("/")).resolve()
    return None


def check_compose_dir(compose_dir: Path) -> list[str]:
    """Problems with the compose files of ``compose_dir``: the compose spec's schema, bind-mount
    sources missing next to them, configuration files a command names but no mount provides,
    undeclared named volumes, and Grafana's dashboard provisioning path."""
    schema = json.loads(COMPOSE_SCHEMA.read_text("utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    problems: list[str] = []
    base: dict[str, Any] = {}
    for name in ("compose.yaml", "compose.file-export.yaml"):
        compose = yaml.safe_load((compose_dir / name).read_text("utf-8"))
        problems += [f"{name} {list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
        base = base or compose
        for service_name, service in compose["services"].items():
            where = f"{name} {service_name}"
            mounts = _bind_mounts(service)
            if name != "compose.yaml":  # an overlay keeps the base file's mounts
                mounts = {**_bind_mounts(base["services"].get(service_name, {})), **mounts}
            for source in mounts.values():
                if source not in USER_CREATED and not (compose_dir / source).exists():
                    problems.append(f"{where}: mounts {source}, not in {compose_dir}")
            for path in _config_paths(service):
                host = _mounted_file(mounts, path, compose_dir)
                if host is None or not host.is_file():
                    problems.append(f"{where}: reads {path}, which no mount provides")
            for volume in service.get("volumes", []):
                source = str(volume).split(":")[0]
                if not source.startswith((".", "/")) and source not in base.get("volumes", {}):
                    problems.append(f"{where}: named volume {source} is not declared")
    grafana = base["services"]["grafana"]
    grafana_mounts = _bind_mounts(grafana)
    provisioning = compose_dir / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text())[
        "providers"
    ]
    dashboards = _mounted_file(grafana_mounts, provider["options"]["path"], compose_dir)
    if dashboards is None or not list(dashboards.glob("*.json")):
        problems.append(f"grafana: no dashboards at {provider['options']['path']}")
    home = grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    home_file = _mounted_file(grafana_mounts, home, compose_dir) if home else None
    if home and (home_file is None or not home_file.is_file()):
        problems.append(f"grafana: the home dashboard {home} is not mounted")
    return problems


@pytest.mark.network
def test_assets_from_the_wheel_validate(wheel_venv: Path, tmp_path: Path) -> None:
    """``crew-otel assets DIR`` from the installed wheel: the compose files follow the compose
    spec and mount only what DIR holds, promtool checks and unit-tests the alert rules in DIR,
    and the dashboards load with the uids, titles and panels of this checkout's."""
    out = tmp_path / "stack"
    written = subprocess.run(
        [str(wheel_venv / "crew-otel"), "assets", str(out)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=_user_env(tmp_path),
    )
    assert written.returncode == 0, written.stderr
    assert not check_compose_dir(out / "collector")

    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH (./scripts/system-deps.sh installs it)"
    rules = out / "collector" / "prometheus"
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        checked = subprocess.run(
            [promtool, *command], capture_output=True, text=True, check=False, cwd=rules
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr

    expected = {
        path.name: json.loads(path.read_text("utf-8")) for path in ROOT.glob("dashboards/*.json")
    }
    loaded = {path.name: json.loads(path.read_text("utf-8")) for path in out.glob("dashboards/*")}
    assert set(loaded) == set(expected)
    for name, dashboard in loaded.items():
        assert dashboard["uid"] == expected[name]["uid"] == name.removesuffix(".json")
        assert dashboard["title"] == expected[name]["title"]
        assert dashboard["title"].startswith("crew_otel / ")
        assert len(dashboard["panels"]) == len(expected[name]["panels"]) > 0
        assert all(panel.get("type") and panel.get("title") for panel in dashboard["panels"])


def test_compose_check_catches_a_missing_mount(tmp_path: Path) -> None:
    """The compose check above fails when a mounted file or a provisioned path is missing."""
    out = tmp_path / "stack"
    subprocess.run(
        [sys.executable, "-m", "crew_otel.cli.main", "assets", str(out)],
        capture_output=True,
        check=True,
    )
    assert not check_compose_dir(out / "collector")
    (out / "collector" / "jaeger" / "config.yaml").unlink()
    for dashboard in (out / "dashboards").glob("*.json"):
        dashboard.unlink()
    problems = "\n".join(check_compose_dir(out / "collector"))
    assert "mounts ./jaeger/config.yaml" in problems
    assert "reads /etc/jaeger/config.yaml" in problems
    assert "grafana: no dashboards" in problems
    assert "home dashboard" in problems


# --- a service with the trace-file exporter under uvicorn --workers 2 ---------------------------

SERVICE = '''\
"""A pip user's service: one small crew per request, spans to the trace file named by
CREW_OTEL_TRACES_FILE (OTEL_TRACES_EXPORTER=crew_otel_file)."""

import asyncio
import os
from contextlib import asynccontextmanager

from crew_otel.testing.crews import prepare_offline_environment

prepare_offline_environment()

from fastapi import FastAPI, Header  # noqa: E402

import crew_otel  # noqa: E402
from crew_otel.testing.crews import make_llm, research_crew  # noqa: E402

telemetry = crew_otel.configure(service_name="pip-user-api")


def warm_up():
    with crew_otel.request(f"warmup-{os.getpid()}"):
        crew = research_crew(lambda: make_llm(os.environ["SERVICE_PROVIDER_URL"]))
        crew.kickoff(inputs={"topic": "warmup"})


@asynccontextmanager
async def lifespan(app):
    # every worker runs one crew at start-up: both processes append to the one trace file
    await asyncio.to_thread(warm_up)
    yield
    telemetry.shutdown(timeout_millis=10000)


app = FastAPI(lifespan=lifespan)


@app.get("/health")
def health():
    return {"pid": os.getpid()}


@app.post("/run")
def run(x_request_id: str = Header()):
    with crew_otel.request(x_request_id):
        crew = research_crew(lambda: make_llm(os.environ["SERVICE_PROVIDER_URL"]))
        result = crew.kickoff(inputs={"topic": x_request_id})
    return {"pid": os.getpid(), "raw": result.raw}
'''
COUNT_PROBES = (
    "import sys; from crew_otel.otlp_json import read_file; "
    "print(sum(s.name == 'GET /health' for s in read_file(sys.argv[1])))"
)
#: The request ID of each worker's start-up crew, as it appears in the trace file.
WARMUP = re.compile(r"warmup-\d+")
#: Request IDs with no common prefix: the report's timeline prints them whole.
REQUEST_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


@pytest.mark.network
def test_two_uvicorn_workers_write_one_trace_file(
    wheel_venv: Path, tmp_path: Path, fake_provider: Any
) -> None:
    """``OTEL_TRACES_EXPORTER=crew_otel_file`` under ``uvicorn --workers 2``: both workers
    append to one file, and ``crew-otel report`` reads every request sent."""
    (tmp_path / "app.py").write_text(SERVICE)
    traces = tmp_path / "traces"
    traces.mkdir()
    trace_file = traces / "traces.jsonl"
    port = free_port()
    env = {
        **_user_env(tmp_path),
        "OTEL_TRACES_EXPORTER": "crew_otel_file",
        "CREW_OTEL_TRACES_FILE": str(trace_file),
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "SERVICE_PROVIDER_URL": fake_provider.base_url,
    }
    log = (tmp_path / "uvicorn.log").open("w")
    server = subprocess.Popen(
        [str(wheel_venv / "uvicorn"), "app:app", "--workers", "2", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    sent: list[str] = []
    pids: set[int] = set()
    try:
        with httpx.Client(timeout=120) as client:

            def healthy() -> bool:
                assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()[-3000:]
                try:
                    return client.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 180, "the service to answer /health")

            def call(request_id: str) -> int:
                response = client.post(f"{url}/run", headers={"X-Request-ID": request_id})
                assert response.status_code == 200, response.text
                return int(response.json()["pid"])

            # 8 concurrent requests (whichever worker the kernel hands each to)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                ids = [f"{word}0" for word in REQUEST_WORDS]
                pids |= set(pool.map(call, ids))
                sent += ids

            def both_workers_warmed_up() -> bool:
                text = trace_file.read_text() if trace_file.exists() else ""
                return len(set(WARMUP.findall(text))) == 2

            # each worker's start-up crew reaches the file (the exporter writes in batches)
            wait_for(both_workers_warmed_up, 60, "both workers' start-up spans in the file")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
    assert pids, "the workers answered"
    assert len(set(WARMUP.findall(trace_file.read_text()))) == 2, "both workers wrote spans"
    assert [p.name for p in traces.iterdir()] == ["traces.jsonl"]

    summary = tmp_path / "summary.json"
    report = subprocess.run(
        [str(wheel_venv / "crew-otel"), "report", "--summary-json", str(summary), str(trace_file)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**_user_env(tmp_path), "COLUMNS": "160"},
    )
    assert report.returncode == 0, report.stdout + report.stderr
    for request_id in sent:
        assert request_id in report.stdout, request_id
    (figures,) = json.loads(summary.read_text())["services"].values()
    # the FastAPI instrumentation traced the readiness probes too: each is a request
    probes = subprocess.run(
        [str(wheel_venv / "python"), "-c", COUNT_PROBES, str(trace_file)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=_user_env(tmp_path),
    ).stdout
    # the requests sent, the readiness probes and each worker's start-up crew
    assert figures["requests"] == len(sent) + int(probes) + 2
    assert figures["failed"] == 0
    assert len(figures["processes"]) == 2
