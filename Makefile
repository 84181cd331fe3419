# Parley: `make run` serves the chat, `make test` runs every test. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
REQUIREMENTS := requirements.txt requirements-dev.txt $(wildcard operator/requirements.txt)

.PHONY: install run test lint bench browser-deps clean

$(STAMP): $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt $(addprefix -r ,$(wildcard operator/requirements.txt))
	touch $(STAMP)

install: $(STAMP)

## run: one Daphne protocol process + one worker; SQLite and an embedded Redis unless
## DATABASE_URL / REDIS_URL(S) are set. PORT (default 8000) picks the port.
run: install
	$(PY) tools/stack.py

## test: the whole suite (PostgreSQL when 127.0.0.1:5432 answers, else SQLite), plus lint.
test: install browser-deps lint
	$(PY) tools/run_tests.py $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

## The browser test drives Debian's Chromium through Playwright (no browser download).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and cannot install it: the browser test will be skipped"; fi; }

bench: install
	$(PY) loadtest/bench.py

clean:
	rm -rf $(VENV) var
