# The two commands a new user needs (both set everything up first):
#   make run    one federated, DP, multimodal simulation on the built-in synthetic data
#   make test   the whole test suite (fast unit tests + end-to-end Flower runs)
PY := .venv/bin/python
ARGS ?=
# Tests run on WORKERS pytest-xdist processes (WORKERS=0: in this process, one after another).
# --dist loadgroup runs each group on one worker, whole and in order (tests/conftest.py,
# xdist_group_of): the e2e tests that start Ray, the deployment e2e tests, the frontier e2e
# sweep (in process, no Ray), each real dataset's
# cache users, each unit module; the other worker meanwhile takes the next group.
WORKERS ?= 2
XDIST := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup)

.PHONY: setup run test test-fast lint bench clean

setup:
	@./scripts/setup.sh

run: setup
	$(PY) -m simulations.run $(ARGS)

test: setup
	$(PY) -m pytest -q -ra --durations=15 $(XDIST) $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra --durations=15 -m "not e2e and not slow" $(XDIST) $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy fedmer server client simulations hydra_plugins

clean:
	rm -rf outputs multirun .pytest_cache
