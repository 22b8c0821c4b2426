# sgctl: the two commands a newcomer needs are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.sgctl-installed

.PHONY: setup demo test test-unit test-kernel lint typecheck clean bench bench-full

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# The whole suite: lint, types, unit, kernel (BPF_PROG_TEST_RUN), differential, end-to-end.
test: setup
	$(VENV)/bin/ruff check controller tests
	$(VENV)/bin/mypy -p controller
	$(PY) -m pytest -q -ra --durations=15 tests

# By what they need: tests/unit (nothing), tests/kernel (root, bcc), tests/netns (root, links).
test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

test-kernel: setup
	$(PY) -m pytest -q -ra tests/kernel

# Benchmarks (not part of test): a few minutes / a longer run with more samples.
# Both write BENCHMARKS.md, docs/bench/results.json and docs/bench/*.png.
bench: setup
	$(PY) -m controller.tools.bench --profile quick

bench-full: setup
	$(PY) -m controller.tools.bench --profile full

lint: setup
	$(VENV)/bin/ruff check controller tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
