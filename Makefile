# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv and
# installs what it needs; a second install is a quick no-op (stamp files keyed on pyproject).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO_CLUSTER := cluster_configs/local/three-region.yaml

.PHONY: demo test test-slow bench install clean prometheus postgresql chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is pinned in pyproject (2.13.0): pip takes the CPU build, never a multi-GB CUDA one.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m mlplatform.demo --cluster $(DEMO_CLUSTER)

# The observability tests scrape Ray's metrics with a real Prometheus (Debian's package). A failed
# install fails `make test`: the metrics path must be tested, not skipped.
prometheus:
	command -v prometheus >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)
	@command -v prometheus >/dev/null || { echo "prometheus is not on PATH after installing it: install it (apt-get install prometheus) and rerun"; exit 1; }

# The registry's tests run on SQLite and on a live PostgreSQL server they start (Debian's package).
postgresql:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq postgresql)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "PostgreSQL's initdb is missing after installing it: apt-get install postgresql, then rerun"; exit 1; }

# The dashboard's browser test drives Debian's chromium and chromedriver (never a downloaded browser
# build). Unlike prometheus, a failed install does not fail `make test-slow`: that one test skips and says why.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
		|| echo "chromium did not install: tests/integration/test_dashboard_browser.py will be skipped"

# The default suite; runs marked `slow` (own clusters, preemptions) go with `make test-slow`,
# which CI runs right after `make test`.
test: $(VENV)/.installed-dev prometheus postgresql
	$(BIN)/python -m pytest -m "not slow" --durations=15 tests

test-slow: $(VENV)/.installed-dev prometheus postgresql chromium
	$(BIN)/python -m pytest -m slow tests

bench: $(VENV)/.installed-dev
	for b in tests/benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info
