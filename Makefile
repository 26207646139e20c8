# The two commands a new user needs (both set everything up first):
#   make run    one federated, DP, multimodal simulation on the built-in synthetic data
#   make test   the whole test suite (fast unit tests + end-to-end Flower runs)
PY := .venv/bin/python
ARGS ?=

.PHONY: setup run test test-fast lint bench clean

setup:
	@./scripts/setup.sh

run: setup
	$(PY) -m simulations.run $(ARGS)

test: setup
	$(PY) -m pytest -q -ra --durations=15 $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra -m "not e2e and not slow" $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy fedmer server client simulations

clean:
	rm -rf outputs multirun .pytest_cache
