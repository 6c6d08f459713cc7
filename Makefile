# Dispatch: `make help` lists the targets. Every target creates the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.DEFAULT_GOAL := help

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Dispatch needs Python 3.11+") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The server alone, for `make run` (no test, lint or benchmark tools); a dev install has it too.
SERVER_STAMP := $(VENV)/.installed-server

$(SERVER_STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Dispatch needs Python 3.11+") if sys.version_info < (3, 11) else None'
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then :; else \
		$(PYTHON) -m venv $(VENV) && \
		$(BIN)/python -m pip install -q --upgrade pip && \
		$(BIN)/python -m pip install -q -e '.[server]'; \
	fi
	touch $(SERVER_STAMP)

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: install
install: $(STAMP) ## create .venv and install Dispatch with its dev tools

.PHONY: run
run: $(SERVER_STAMP) ## run the broker (embedded Postgres in ./.dispatch unless DISPATCH_DATABASE_URL is set)
	$(BIN)/dispatch serve

.PHONY: migrate
migrate: $(SERVER_STAMP) ## apply pending migrations to the configured database
	$(BIN)/dispatch migrate

.PHONY: test
test: $(STAMP) ## run the test suite against real Postgres (and real NATS); PYTEST_ARGS picks a part
	DISPATCH_TEST_PORTS=$${DISPATCH_TEST_PORTS:-20000-26000} $(BIN)/pytest $(PYTEST_ARGS)

.PHONY: screenshots
screenshots: $(STAMP) ## run the dashboard's browser tests, saving their screenshots in docs/screenshots
	DISPATCH_SCREENSHOT_DIR=docs/screenshots DISPATCH_REQUIRE_BROWSER=1 $(BIN)/pytest tests/ui/test_browser.py tests/ui/test_schedules_page.py tests/ui/test_triage_task_page.py tests/ui/test_triage_task_list.py tests/ui/test_triage_agents.py -q

.PHONY: lint
lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check dispatch tests bench
	$(BIN)/mypy

.PHONY: clean
clean: ## remove the virtualenv and caches (keeps ./.dispatch data)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

.PHONY: bench
bench: $(BENCH_STAMP) ## benchmark beside pgqueuer/procrastinate on both Postgres builds; writes BENCHMARKS.md (~2 x 10 min; BENCH_PG=embedded|distribution for one; sizes: python -m bench --help)
	@for build in $${BENCH_PG:-embedded distribution}; do \
		if [ $$build = distribution ] && ! where=$$($(BIN)/python -m tests.pgdist); then \
			echo "bench: distribution build skipped, $$where"; continue; \
		fi; \
		BENCH_PG=$$build $(BIN)/python -m bench || exit 1; \
	done

.PHONY: bench-soak
bench-soak: $(BENCH_STAMP) ## soak: dead tuples and claim p99 over BENCH_SOAK_SECONDS (1800 s), retention on
	$(BIN)/python -m bench --soak

.PHONY: test-distribution
test-distribution: $(STAMP) ## the suite again on the distribution's PostgreSQL (pg_config --bindir; stock settings, JIT on)
	@if where=$$($(BIN)/python -m tests.pgdist); then \
		echo "test-distribution: PostgreSQL from $$where"; \
		DISPATCH_TEST_PG=distribution DISPATCH_TEST_PORTS=$${DISPATCH_TEST_PORTS:-26000-32000} $(BIN)/pytest $(PYTEST_ARGS); \
	else \
		echo "test-distribution: skipped, $$where"; \
	fi
