# `make demo` and `make test` work from a bare machine with only Python.
# torch==2.13.0 is installed first: it is a local CPU wheel, any other spec pulls a CUDA build.
# `make test` runs the suite twice: on torch 2.13.0 (.venv) and on torch 2.14.1 with torchvision
# 0.29.1 (.venv214; both from local disk, torchvision does not import beside 2.13.0), so both
# capture paths and the third-party models are tested on every submission.
PYTHON ?= python3
VENV ?= .venv
VENV214 ?= .venv214
BIN = $(VENV)/bin
BIN214 = $(VENV214)/bin

.PHONY: demo test venv venv214 clean

$(BIN)/gradprobe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

$(BIN214)/gradprobe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV214)
	$(BIN214)/pip install -q --upgrade pip
	$(BIN214)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN214)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/gradprobe-installed

venv214: $(BIN214)/gradprobe-installed

demo: venv
	$(BIN)/gradprobe demo -o report.html

test: venv venv214
	$(BIN)/python -m pytest -q
	$(BIN214)/python -m pytest -q

clean:
	rm -rf $(VENV) $(VENV214) report.html
