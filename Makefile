# `make demo` and `make test` work from a bare machine with only Python.
# torch==2.13.0 is installed first: it is a local CPU wheel, any other spec pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/gradprobe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/gradprobe-installed

demo: venv
	$(BIN)/gradprobe demo -o report.html

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) report.html
