# loraplex: the commands a newcomer needs. `make help` lists them.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo demo-routing fleet serve test test-unit lint bench bench-noisy reliability chaos clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## build .venv with loraplex, vLLM (CPU or GPU build) and the dev tools

$(STAMP): pyproject.toml deploy/install.sh
	bash deploy/install.sh $(VENV) dev

demo: install  ## build the demo base, start the server, send requests with the openai client
	$(PY) -m server.dev.demo

demo-routing: install  ## a routed model: a fine-tuned classifier picks one of three adapters per request; its routing eval
	$(PY) -m server.dev.demo_routing

fleet: install  ## the production topology on loopback: 2 bases, an engine and a worker per base, 2 gateways, Redis, PostgreSQL, S3
	$(PY) -m server.dev.fleet

serve: install  ## run the gateway with one supervised engine (Ctrl-C stops both)
	$(VENV)/bin/loraplex serve

lint: install  ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint  ## everything CI runs: lint, unit, PostgreSQL, S3 and end-to-end tests on real vLLM
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install  ## fast tests only (no vLLM engine)
	$(PY) -m pytest -m "not e2e" $(PYTEST_ARGS)

bench: install  ## benchmarks side by side with peers; writes bench/results/ (numbers, never asserts)
	bash bench/run.sh

bench-noisy: install  ## a quiet tenant's TTFT beside a flooding one, fair queueing off and on (real vLLM)
	$(PY) -m bench.noisy_neighbour

reliability: install  ## fuzzing, isolation probes, fault injection and load; writes docs/reliability.md
	$(PY) -m pytest -m reliability $(PYTEST_ARGS); status=$$?; \
	$(PY) -m tests.reliability && exit $$status

chaos: install  ## the fleet under traffic while processes die for 5 min; checks; bench/results/chaos.json
	$(PY) -m server.dev.chaos --minutes 5 $(CHAOS_ARGS)

clean:  ## remove the virtualenv and the embedded state under .loraplex/
	rm -rf $(VENV) .loraplex .pytest_cache .mypy_cache .ruff_cache
