"""Where the example services live: packaged in the wheel, or ``examples/`` in a checkout."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

#: The demo's services, in the order it drives them: the article's broken pattern, the
#: half-fixed one (CrewAI objects per request, tool state still shared), and the fixed one.
SERVICES = {
    "broken": "broken_service.py",
    "halffixed": "halffixed_service.py",
    "fixed": "fixed_service.py",
}
#: The ``service.namespace`` of every demo service.
SERVICE_NAMESPACE = "crew-otel-demo"


def service_name(service: str) -> str:
    """The ``service.name`` of a demo service (a key of :data:`SERVICES`)."""
    return f"support-api-{service}"


def failures_file(trace_file: Path) -> Path:
    """Where a demo service writes its ``crew_otel.failures`` counts when it stops (next to
    its trace file): ``{"shared_instance": 7, ...}``."""
    return trace_file.with_name(trace_file.stem + ".failures.json")


def example_path(service: str) -> Path:
    """Path of the example file for ``service`` (a key of :data:`SERVICES`)."""
    filename = SERVICES[service]
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (
        package_dir / "_examples" / filename,
        package_dir.parent / "examples" / filename,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"example service {filename} not found next to crew_otel")


def load_service(service: str, workdir: Path | None = None) -> ModuleType:
    """Import the example module under its file's name (``halffixed_service``, ...).

    With ``workdir``, the module is loaded from a copy there: installed from a wheel, the
    examples sit inside an installed package, and crew_otel (rightly) does not watch the state
    that installed packages' code keeps; a copy is the application's own code, as the example
    is in a real service. This imports crewai: prepare the environment first.
    """
    path = example_path(service)
    if workdir is not None:
        path = Path(shutil.copy2(path, workdir / path.name))
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
