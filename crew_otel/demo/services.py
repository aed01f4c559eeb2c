"""Where the example services live: packaged in the wheel, or ``examples/`` in a checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SERVICES = {"broken": "broken_service.py", "fixed": "fixed_service.py"}


def example_path(service: str) -> Path:
    """Path of the example file for ``service`` (``broken`` or ``fixed``)."""
    filename = SERVICES[service]
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (
        package_dir / "_examples" / filename,
        package_dir.parent / "examples" / filename,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"example service {filename} not found next to crew_otel")


def load_service(service: str) -> ModuleType:
    """Import the example module (this imports crewai: prepare the environment first)."""
    path = example_path(service)
    name = f"crew_otel_demo_{service}_service"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
