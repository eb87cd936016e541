# AgentMesh — the commands a person types. `make run` brings the mesh up and asks it a question;
# `make test` runs every check CI runs. Both install what they need on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
BUF    := node_modules/.bin/buf
# Where `buf breaking` compares the contracts against (override: make breaking AGAINST=...).
AGAINST ?= .git\#branch=main,subdir=protos
DEMO_QUESTION ?= How do I parse a JSON string into a Python object?

.PHONY: help install run up down status chat ingest test pytest lint-protos breaking generate check-generated check-chart k8s bench bench-router bench-memory bench-orchestrator bench-sandbox bench-retrieval bench-e2e bench-soak clean

help:
	@echo "make run       start the whole mesh locally, ingest the demo corpus, stream a demo answer"
	@echo "make down      stop the mesh"
	@echo "make test      every check CI runs (proto lint + breaking + generated code + pytest)"
	@echo "make generate  regenerate gen/ (Python, TypeScript, API reference docs) from protos/"
	@echo "make k8s       regenerate k8s/ from the Helm chart"

# --- installation ---------------------------------------------------------------------------
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (an unpinned torch pulls several GB of CUDA wheels).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	# `npm install` (not `npm ci`): the lock records only the platform packages of the machine that wrote it.
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client example: its protoc-gen-es also generates gen/ts (scripts/generate_protos.sh).
NODE_CLIENT := clients/node/node_modules/.installed
$(NODE_CLIENT): clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed $(NODE_CLIENT)

# --- running --------------------------------------------------------------------------------
run: $(VENV)/.installed
	$(BIN)/agentmesh up --detach
	$(BIN)/agentmesh ingest
	$(BIN)/agentmesh chat "$(DEMO_QUESTION)" --session demo
	@echo
	@echo "The mesh is running (gateway on 127.0.0.1:8080). Ask more with:"
	@echo "  $(BIN)/agentmesh chat \"What does itertools.groupby do?\" --session demo"
	@echo "Stop it with:  make down   (or $(BIN)/agentmesh down)"

up: $(VENV)/.installed
	$(BIN)/agentmesh up

down:
	$(BIN)/agentmesh down

status:
	$(BIN)/agentmesh status

# --- contracts ------------------------------------------------------------------------------
generate: $(VENV)/.installed $(NODE_CLIENT)
	PYTHON=$(PY) scripts/generate_protos.sh

check-generated: $(VENV)/.installed $(NODE_CLIENT)
	PYTHON=$(PY) scripts/generate_protos.sh --check

lint-protos: node_modules/.installed
	$(BUF) lint

breaking: node_modules/.installed
	@if git rev-parse --verify -q main >/dev/null; then \
	  $(BUF) breaking protos --against '$(AGAINST)' && echo "no breaking changes against main"; \
	else echo "no main branch to compare against: skipping buf breaking"; fi

# --- deployment -----------------------------------------------------------------------------
# helm lint --strict + helm template | kubernetes-validate for every ci/ values file, and k8s/ drift.
check-chart: $(VENV)/.installed node_modules/.installed
	PYTHON=$(PY) scripts/check_chart.sh

# Regenerate the kustomize tree in k8s/ from the chart (run after changing helm/ or gateway/).
k8s: $(VENV)/.installed node_modules/.installed
	$(PY) scripts/generate_k8s.py

# --- benchmarks (figures, not tests: each prints a table and writes bench/results/<name>.json) --
bench-router: $(VENV)/.installed
	$(PY) -m bench.router

bench-memory: $(VENV)/.installed
	$(PY) -m bench.memory

bench-orchestrator: $(VENV)/.installed
	$(PY) -m bench.orchestrator

bench-sandbox: $(VENV)/.installed
	$(PY) -m bench.sandbox

bench-retrieval: $(VENV)/.installed
	$(PY) -m bench.retrieval

# The whole mesh through Envoy against a fake provider streaming at a fixed rate (issue 8).
bench-e2e: $(VENV)/.installed
	$(PY) -m bench.e2e

# Ten measured minutes of steady load after a two-minute warm-up, long enough for Redis to reach
# its retention bounds (sessions: 60 s; the tenant's last 1,000 runs: ~85 s at ~12 runs/s); RSS
# of every process over time (bench/results/e2e_soak.json).
bench-soak: $(VENV)/.installed
	$(PY) -m bench.e2e --soak-s 720 --soak-warmup-s 120

bench: bench-router bench-memory bench-orchestrator bench-sandbox bench-retrieval bench-e2e

# --- tests ----------------------------------------------------------------------------------
pytest: $(VENV)/.installed node_modules/.installed $(NODE_CLIENT)
	$(PY) -m pytest -q

test: lint-protos breaking check-generated check-chart pytest

clean:
	rm -rf $(VENV) node_modules clients/node/node_modules clients/node/dist .agentmesh .pytest_cache
