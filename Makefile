# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format clean

# pytest's exit code 5 means "no tests collected": not a failure for these targets.
PYTEST = $(BIN)/python -m pytest -q -n auto --durations=15
define run_pytest
	$(PYTEST) $(1); rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests collected'; exit 0; fi; exit $$rc
endef

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ftsgd demo --out runs/demo --force

# The whole suite (what CI runs), spread over every core by pytest-xdist.
test: $(STAMP)
	$(call run_pytest,)

# The inner loop: everything but the tests marked slow (real torchrun jobs, kill -9 loops, sweeps).
test-fast: $(STAMP)
	$(call run_pytest,-m 'not slow')

lint: $(STAMP)
	$(BIN)/ruff check ftsgd tests benchmarks
	$(BIN)/ruff format --check ftsgd tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format ftsgd tests benchmarks
	$(BIN)/ruff check --fix ftsgd tests benchmarks

clean:
	rm -rf $(VENV) runs build dist *.egg-info
