# The two quickstart commands, `make demo` and `make test`, set everything up themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: the project's environment comes first on PATH.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH" TF_CPP_MIN_LOG_LEVEL=3

.PHONY: setup browser demo test lint format params-doc bench bench-scale lock clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

## Debian's chromium, for the explorer's browser tests and bench (as root, or with sudo).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  command -v apt-get >/dev/null || { echo "Install Debian's chromium at $(CHROMIUM) for the explorer tests" >&2; exit 1; }; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; \
	fi

## Set up and run the whole pipeline on the built-in demo collection.
demo: setup
	$(RUN) $(BIN)/dvc repro
	$(RUN) $(BIN)/dvc metrics show

## Set up, lint and run every test.
test: setup browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(RUN) $(BIN)/python -m pytest -n auto --dist loadfile  # one test file per worker: fixtures stay shared

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Write the README's params table from the params models in stages/.
params-doc: setup
	$(RUN) $(BIN)/python -m tools.params_doc

## Benchmarks print figures; they are not tests.
bench: setup browser
	$(RUN) $(BIN)/python bench/prepare.py
	$(RUN) $(BIN)/python bench/embed.py
	$(RUN) $(BIN)/python bench/cluster.py
	$(RUN) $(BIN)/python bench/explore.py
	$(RUN) $(BIN)/python bench/patterns.py

## The whole pipeline at scale: 10,000 ISS-like frames, then 1% more with frozen models.
bench-scale: setup
	$(RUN) $(BIN)/python bench/scale.py --frames 10000 --grow 1

## Regenerate requirements.txt (every pin) from requirements.in (the direct dependencies).
lock:
	rm -rf /tmp/smart-iss-posts-lock
	$(PYTHON) -m venv /tmp/smart-iss-posts-lock
	/tmp/smart-iss-posts-lock/bin/python -m pip install --quiet -r requirements.in
	{ echo "# Every package the project installs, pinned (generated from requirements.in by \`make lock\`)."; \
	  /tmp/smart-iss-posts-lock/bin/python -m pip freeze; } > requirements.txt

## Drop the decoded-image cache of prepare (it is rebuilt on the next run).
clean-cache:
	rm -rf data/cache
