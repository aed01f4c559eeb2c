"""What the benchmarks install for themselves, pinned, next to the environment they run in.

Nothing is installed into the running environment. Each set goes into its own directory
under ``benchmarks/.deps/`` with ``pip install --no-deps --target`` and is put in front of
``PYTHONPATH`` only for the processes that need it, so:

* the competitors run against exactly the same crewai, openai, httpx and OpenTelemetry as
  crew_otel (their requirements are checked against that environment, see :func:`check`),
* the competitors never meet each other (or crew_otel's tests) in one interpreter,
* deleting ``benchmarks/.deps/`` undoes everything.

``python -m benchmarks.deps`` installs (or checks) all sets and prints what it did.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.common import DEPS_DIR

#: pyperf (and psutil, which it uses for system metadata) for the microbenchmarks.
TOOLS = ("pyperf==2.11.0", "psutil==7.2.2")

#: Each competitor as its documentation says to install it for a CrewAI app whose LLM is
#: CrewAI's native OpenAI provider: the CrewAI instrumentation plus the OpenAI SDK
#: instrumentation (model-call spans), with the support packages they require that the
#: crew_otel environment does not already have.
COMPETITORS: dict[str, tuple[str, ...]] = {
    "openinference": (
        "openinference-instrumentation-crewai==1.1.21",
        "openinference-instrumentation-openai==0.1.66",
        "openinference-instrumentation==0.1.72",
        "openinference-semantic-conventions==0.1.42",
    ),
    "openllmetry": (
        "opentelemetry-instrumentation-crewai==0.62.4",
        "opentelemetry-instrumentation-openai==0.62.4",
        "opentelemetry-semantic-conventions-ai==0.5.1",
    ),
}


class DependencyError(RuntimeError):
    """A set could not be installed, or needs something the environment lacks."""


def _marker(directory: Path) -> Path:
    return directory / ".installed"


def _installer() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    uv = shutil.which("uv")
    if uv is not None:
        return [uv, "pip", "install", "-q", "--python", sys.executable]
    raise DependencyError("neither pip nor uv is available to install benchmark dependencies")


def ensure(name: str, requirements: tuple[str, ...]) -> Path:
    """Install ``requirements`` into ``benchmarks/.deps/NAME`` unless already there."""
    directory = DEPS_DIR / name
    wanted = "\n".join(requirements) + "\n"
    marker = _marker(directory)
    if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    command = [*_installer(), "--no-deps", "--target", str(directory), *requirements]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise DependencyError(
            f"installing {name} failed:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}"
        )
    marker.write_text(wanted, encoding="utf-8")
    return directory


def check(directory: Path) -> list[str]:
    """Requirements of the distributions in ``directory`` that the combined path lacks."""
    from packaging.requirements import Requirement

    search = [str(directory), *sys.path]
    available: dict[str, str] = {}
    for dist in metadata.distributions(path=search):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        available.setdefault(name, dist.version)
    problems = []
    for dist in metadata.distributions(path=[str(directory)]):
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            have = available.get(requirement.name.lower().replace("_", "-"))
            if have is None:
                problems.append(f"{dist.metadata['Name']} needs {requirement} (missing)")
            elif have not in requirement.specifier:
                problems.append(f"{dist.metadata['Name']} needs {requirement} (have {have})")
    return problems


def ensure_tools() -> Path | None:
    """pyperf for this interpreter: None if importable already, else its overlay directory."""
    if importlib.util.find_spec("pyperf") is not None:
        return None
    directory = ensure("tools", TOOLS)
    sys.path.insert(0, str(directory))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(directory), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return directory


def ensure_competitor(name: str) -> Path:
    directory = ensure(name, COMPETITORS[name])
    problems = check(directory)
    if problems:
        raise DependencyError(f"{name} does not fit this environment: " + "; ".join(problems))
    return directory


def main() -> None:
    tools = ensure_tools()
    print("pyperf:", "already importable" if tools is None else "installed in benchmarks/.deps")
    for name, requirements in COMPETITORS.items():
        ensure_competitor(name)
        print(f"{name}: installed in benchmarks/.deps/{name} ({', '.join(requirements)})")


if __name__ == "__main__":
    main()
