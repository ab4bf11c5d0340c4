# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# constraints.txt pins torch to the CPU wheel on this machine; elsewhere any torch >= 2.4 works.
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev,eval,analysis]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dualpath demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
