# Two commands set everything up on a fresh machine (see README):
#   make demo   -> creates/refreshes .venv, fetches SmolLM2 + MovieLens-100K into the cache, runs the main job
#   make test   -> creates/refreshes .venv, runs the test suite
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: env demo test lint bench clean

env:
	@bash scripts/setup_env.sh

demo: env
	$(PY) -m recsys_tapper demo

test: env
	$(PY) -m pytest tests -q

lint: env
	$(VENV)/bin/ruff check recsys_tapper embeddings llm_bridge tests benchmarks

clean:
	rm -rf runs outputs .pytest_cache
