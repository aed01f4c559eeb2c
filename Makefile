# crew-otel: `make demo` runs the offline demo, `make test` runs everything CI runs.
PYTHON ?= python3
# Extra pytest arguments for unit, test-lowest and test-pythons (e.g. a marker selection).
SELECT ?=
# pytest-xdist: one worker per core and one more (some tests mostly wait: CrewAI's 60 s RPM
# sleep, worker processes starting); a file's tests stay on one worker (some start servers once
# per module).
XDIST ?= -n $(shell echo $$(( $$(nproc) + 1 ))) --dist loadfile
# The other interpreters the package claims (3.11 is the default one): the Python-sensitive
# tests run on each (scripts/find-python.sh finds them).
OTHER_PYTHONS ?= 3.10 3.12 3.13
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

.PHONY: demo test setup setup-lowest setup-openai3 setup-coexist setup-pythons lint typecheck unit \
	test-lowest test-openai3 test-coexist test-pythons test-packaging load bench clean

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
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture

typecheck: setup
	$(VENV)/bin/mypy

# `unit`: every test file but the coexistence set and the built wheel, on the latest versions,
# spread over the cores by pytest-xdist.
unit: setup
	./scripts/system-deps.sh
	$(VENV)/bin/python -m pytest -q $(XDIST) --durations=15 --ignore=tests/test_coexistence.py \
		--ignore=tests/test_packaging.py $(SELECT)

$(LOWEST_VENV)/.installed: pyproject.toml $(VENV)/.installed
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(UV) pip install -q --python $(LOWEST_VENV)/bin/python -e ".[test]" $(LOWEST_PINS)
	$(LOWEST_VENV)/bin/python $(WARM_UP)
	touch $@

setup-lowest: $(LOWEST_VENV)/.installed

# The tests that depend on the CrewAI or OpenTelemetry version (tests/conftest.py lists them:
# the hooks into CrewAI's internals and what they record) but the slow one (CrewAI's 60 s
# RPM sleep); the rest runs once, in `unit`.
test-lowest: setup-lowest
	$(LOWEST_VENV)/bin/python -m pytest -q $(XDIST) --versions=crewai -m "not slow" $(SELECT)

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
		tests/test_errors.py tests/test_compat.py tests/test_http_headers.py

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

# The Python-sensitive tests (bytecode and AST analysis, threads, context) on each of
# OTHER_PYTHONS, in .venv-py3.X with the `test` extra.
PYTHON_VENVS = $(foreach version,$(OTHER_PYTHONS),.venv-py$(version)/.installed)
.venv-py%/.installed: pyproject.toml $(VENV)/.installed
	$(UV) venv -q --allow-existing --python "$$(./scripts/find-python.sh $*)" .venv-py$*
	$(UV) pip install -q --python .venv-py$*/bin/python -e ".[test]"
	.venv-py$*/bin/python $(WARM_UP)
	touch $@

setup-pythons: $(PYTHON_VENVS)

test-pythons: $(PYTHON_VENVS)
	@failed=""; for version in $(OTHER_PYTHONS); do \
		echo "--- Python $$version"; \
		.venv-py$$version/bin/python -m pytest -q $(XDIST) --versions=python $(SELECT) \
			|| failed="$$failed $$version"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed on Python$$failed"; exit 1; fi

# Every environment is set up side by side (mostly downloads), then the suites run one after the
# other, each spread over the cores by pytest-xdist, and the built-wheel checks (mostly
# waiting for PyPI) beside them.
test:
	./scripts/system-deps.sh
	$(MAKE) --no-print-directory setup
	$(MAKE) --no-print-directory -j4 --output-sync=target setup-lowest setup-openai3 \
		setup-coexist setup-pythons lint typecheck
	$(MAKE) --no-print-directory -k -j2 --output-sync=target test-packaging suites

.PHONY: suites
suites:
	$(MAKE) --no-print-directory -k unit test-lowest test-openai3 test-coexist test-pythons

# The random-fault load (300 concurrent runs, a provider in its own process): a benchmark of
# robustness, not part of `make test` (tests/test_load.py).
load: setup
	$(VENV)/bin/python -m pytest -q -m load tests/test_load.py

bench: setup
	$(VENV)/bin/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(OPENAI3_VENV) $(COEXIST_VENV) .venv-py3.* .pytest_cache \
		.mypy_cache .ruff_cache
