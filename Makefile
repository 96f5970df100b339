# The two commands of the README's quick start:
#   make run    set everything up and run the main job
#   make test   set everything up and run the quality gate (ruff + the whole test suite)
# Both work on a fresh Debian 12 machine with only python3 (and, as root, apt-get).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the data sets live; the product never assumes this path, the Makefile just points at it.
SKIPFLEET_DATA_DIR ?= $(abspath ../shared/data)
export SKIPFLEET_DATA_DIR

.PHONY: setup system-deps broker-deps run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian packages the integration tests talk to (mosquitto broker, prometheus + promtool, and for
# the compose fleet on a real engine: docker.io, docker-compose, debootstrap).
system-deps:
	@bash deploy/install-system-deps.sh

# The broker simulate starts: mosquitto, installed as root when missing; where that cannot be
# done (not root, no apt-get), simulate stops with how to install it.
broker-deps:
	@bash deploy/install-system-deps.sh --if-possible mosquitto

# ruff, then mypy over what [tool.mypy] in pyproject.toml lists (strict for shared/, coordinator/)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The suite runs with a Docker engine: as root, deploy/docker-engine.sh starts Debian's dockerd
# when none answers, and stops it when the suite is done.
test: setup system-deps lint
	bash deploy/docker-engine.sh run $(BIN)/python -m pytest

# The main job: a simulated fan fleet whose rooms turn noisy at 30 s; the coordinator notices
# and starts a federated run by itself; then three new fans without labels join and get what
# their cluster learned. Writes out/simulate.json and out/simulate.html.
run: setup broker-deps
	$(BIN)/skipfleet simulate --devices 8 --dataset fan --runs 1 --drift-at 30 --new-devices 3 \
		--json out/simulate.json --report out/simulate.html

bench: setup
	$(BIN)/skipfleet bench trainer --dataset damage1 --methods all --trials 20 --json out/bench-damage1.json
	$(BIN)/skipfleet bench trainer --dataset damage2 --methods all --trials 20 --json out/bench-damage2.json
	$(BIN)/skipfleet bench trainer --dataset har --methods all --trials 20 --json out/bench-har.json

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
