# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both create the virtual environment in .venv on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ftsgd demo --out runs/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo 'no tests collected'; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check ftsgd tests benchmarks
	$(BIN)/ruff format --check ftsgd tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format ftsgd tests benchmarks
	$(BIN)/ruff check --fix ftsgd tests benchmarks

clean:
	rm -rf $(VENV) runs build dist *.egg-info
