# crew-otel: `make demo` runs the offline demo, `make test` runs everything CI runs.
PYTHON ?= python3
# Extra pytest arguments for unit and test-lowest (e.g. a marker selection).
SELECT ?=
VENV ?= .venv
LOWEST_VENV ?= .venv-lowest
OPENAI3_VENV ?= .venv-openai3
COEXIST_VENV ?= .venv-coexist
UV = $(VENV)/bin/uv
# Bytecode caches: an environment that sets PYTHONDONTWRITEBYTECODE (CI's does) compiles CrewAI
# and its dependencies from source in every process, about 7 CPU-seconds per test subprocess
# (README snippets, the CLI and the demo's services, worker processes). The recipes write the
# caches once (each environment's set-up imports CrewAI) and every later process reads them.
unexport PYTHONDONTWRITEBYTECODE
# Compiles the modules a test process imports into each environment's bytecode cache, once.
WARM_UP = -c "import crew_otel.testing.crews as c; c.prepare_offline_environment(); import crewai, crew_otel, fastapi, uvicorn, httpx"
# The lowest supported versions: CrewAI 1.12 (and the OpenTelemetry 1.34 it pins).
LOWEST_PINS = "crewai==1.12.2" "opentelemetry-sdk==1.34.1" "opentelemetry-api==1.34.1"

.PHONY: demo test setup setup-lowest setup-openai3 setup-coexist lint typecheck unit unit-core unit-apps \
	test-lowest test-openai3 test-coexist test-packaging slow-latest slow-lowest bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv
	$(UV) pip install -q --python $(VENV)/bin/python -e ".[dev]"
	$(VENV)/bin/python $(WARM_UP)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/crew-otel demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# `unit` runs in two processes: the files that start applications in subprocesses (README
# snippets, the CLI and demo, opentelemetry-instrument, worker pools, a live Prometheus) and
# the rest.
UNIT_APP_FILES = tests/test_readme.py tests/test_cli.py tests/test_compat.py \
	tests/test_process_lifecycle.py tests/test_prometheus_live.py

unit: unit-core unit-apps

unit-core: setup
	./scripts/system-deps.sh
	$(VENV)/bin/python -m pytest -q --durations=10 --ignore=tests/test_coexistence.py \
		$(addprefix --ignore=,$(UNIT_APP_FILES)) $(SELECT)

unit-apps: setup
	./scripts/system-deps.sh
	$(VENV)/bin/python -m pytest -q --durations=10 $(UNIT_APP_FILES) $(SELECT)

$(LOWEST_VENV)/.installed: pyproject.toml $(VENV)/.installed
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(UV) pip install -q --python $(LOWEST_VENV)/bin/python -e ".[test]" $(LOWEST_PINS)
	$(LOWEST_VENV)/bin/python $(WARM_UP)
	touch $@

setup-lowest: $(LOWEST_VENV)/.installed

# Everything that depends on the CrewAI or OpenTelemetry version; the version-independent files
# (static assets, benchmark results, report rendering, bytecode analysis, README snippets, the
# built wheel, alert delivery, the trace file, the pytest plugin, hostile inputs to crew_otel's
# own renderers and request scopes, thread hand-off, series bounds, import-time hooks, ports)
# run once, in `unit`. Of the slow tests, the lowest versions run the load test (the
# worker-process and Celery tests run on the latest).
LOWEST_SKIP = --ignore=tests/test_assets.py --ignore=tests/test_benchmark_results.py \
	--ignore=tests/test_report_shared_state.py --ignore=tests/test_mutations.py \
	--ignore=tests/test_readme.py --ignore=tests/test_packaging.py \
	--ignore=tests/test_assets_faults.py --ignore=tests/test_alerting.py \
	--ignore=tests/test_report_truth.py --ignore=tests/test_trace_file.py \
	--ignore=tests/test_coexistence.py --ignore=tests/test_plugin.py \
	--ignore=tests/test_bad_input.py --ignore=tests/test_request_scope.py \
	--ignore=tests/test_threads.py --ignore=tests/test_bounded_state.py \
	--ignore=tests/test_startup.py --ignore=tests/test_ports.py

test-lowest: setup-lowest
	$(LOWEST_VENV)/bin/python -m pytest -q $(LOWEST_SKIP) $(SELECT)

# openai 3.x talks to providers through httpx2 (crewai pins openai 2.x; this checks both paths).
$(OPENAI3_VENV)/.installed: pyproject.toml $(VENV)/.installed
	$(PYTHON) -m venv $(OPENAI3_VENV)
	$(UV) pip install -q --python $(OPENAI3_VENV)/bin/python -e ".[test]"
	$(UV) pip install -q --python $(OPENAI3_VENV)/bin/python "openai>=3,<4"
	$(OPENAI3_VENV)/bin/python $(WARM_UP)
	touch $@

setup-openai3: $(OPENAI3_VENV)/.installed

test-openai3: $(OPENAI3_VENV)/.installed
	$(OPENAI3_VENV)/bin/python -m pytest -q tests/test_spans.py tests/test_runs.py \
		tests/test_errors.py tests/test_compat.py

# OpenInference's CrewAI instrumentation and the three OpenAI SDK instrumentations beside
# crew_otel. They register opentelemetry_instrumentor entry points that opentelemetry-instrument
# would load in the other suites, so they get their own environment.
COEXIST_PINS = "openinference-instrumentation-crewai>=1.1.21,<2" \
	"opentelemetry-instrumentation-openai-v2>=2.1b0,<2.5" "opentelemetry-util-genai<1.2" \
	"opentelemetry-instrumentation-openai>=0.48.1,<0.63" \
	"openinference-instrumentation-openai>=0.1.66,<0.2"
$(COEXIST_VENV)/.installed: pyproject.toml $(VENV)/.installed
	$(PYTHON) -m venv $(COEXIST_VENV)
	$(UV) pip install -q --python $(COEXIST_VENV)/bin/python -e ".[test]" $(COEXIST_PINS)
	$(COEXIST_VENV)/bin/python $(WARM_UP)
	touch $@

setup-coexist: $(COEXIST_VENV)/.installed

# CREW_OTEL_TEST_COEXIST=1: a missing instrumentation package fails the tests instead of
# skipping them.
test-coexist: $(COEXIST_VENV)/.installed
	CREW_OTEL_TEST_COEXIST=1 $(COEXIST_VENV)/bin/python -m pytest -q tests/test_coexistence.py

# The built wheel, as pip users get it (fresh virtualenvs, PyPI): its own job.
test-packaging: setup
	$(VENV)/bin/python -m pytest -q --durations=5 tests/test_packaging.py

# The environments are independent: set them up and test them in parallel (each
# suite's output is printed whole when it ends). The slow tests (the load test: 300 concurrent
# runs against a provider in its own process; worker processes, Celery, alert delivery) run
# afterwards, beside the built-wheel checks.
test:
	./scripts/system-deps.sh
	$(MAKE) --no-print-directory -j4 --output-sync=target setup setup-lowest setup-openai3 \
		setup-coexist
	$(MAKE) --no-print-directory lint typecheck
	$(MAKE) --no-print-directory -k -j4 --output-sync=target unit-core unit-apps test-lowest \
		test-openai3 test-coexist SELECT='-m "not slow" --ignore=tests/test_packaging.py'
	$(MAKE) --no-print-directory -k -j3 --output-sync=target test-packaging \
		slow-latest slow-lowest

# The slow tests (the load test, worker processes, Celery, alert delivery) on the latest
# versions; on the lowest, the load test.
slow-latest: setup
	$(VENV)/bin/python -m pytest -q --durations=10 -m slow --ignore=tests/test_packaging.py

slow-lowest: setup-lowest
	$(LOWEST_VENV)/bin/python -m pytest -q -m slow tests/test_load.py

bench: setup
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(OPENAI3_VENV) .pytest_cache .mypy_cache .ruff_cache
