"""Generate the crew_otel Grafana dashboards as code.

The JSON files next to this script are generated; edit the modules of
``crew_otel_dashboards/`` (one per dashboard, plus ``promql.py`` and ``grafana.py``), then run

    python dashboards/generate.py          # rewrite dashboards/*.json
    python dashboards/generate.py --check  # exit 1 if a committed file is out of date

Needs crew_otel (metric and label names come from its constants) and the official
grafana-foundation-sdk (Python >= 3.11). Every panel queries the Prometheus data source
picked by the ``${datasource}`` variable and filters on the ``job`` variable (service.name
of the instrumented services). Panels link to Jaeger searches (the Jaeger UI at
``${jaeger_url}``, and Grafana Explore on the ``jaeger`` data source) for the span tags that
matter: ``crew_otel.error.origin=true``, ``crew_otel.shared_instance=true``,
``crew_otel.request.id=...``. Exemplars are on only where tail sampling keeps the traces they
point to (failed operations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from crew_otel_dashboards import DASHBOARDS  # noqa: E402
from grafana_foundation_sdk.builders import dashboard as db  # noqa: E402
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402


def render(builder: db.Dashboard) -> str:
    """The dashboard as stable, diff-friendly JSON text."""
    model = builder.build()
    # Provisioned read-only (allowUiUpdates: false in collector/grafana/provisioning/dashboards):
    # Grafana would refuse to save a UI edit, so the dashboards do not offer one. Change the
    # generator instead. (The SDK has no builder call for false; its model defaults to true.)
    model.editable = False
    data = json.loads(json.dumps(model, cls=JSONEncoder))
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: render(make()) for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build_all().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date, run python dashboards/generate.py:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
