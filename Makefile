# `make demo` and `make test` work from a bare machine with only Python.
# torch==2.13.0 is installed first: it is a local CPU wheel, any other spec pulls a CUDA build.
# `make test` runs the suite twice: on torch 2.13.0 (.venv) and on torch 2.14.1 with torchvision
# 0.29.1 (.venv214; both from local disk, torchvision does not import beside 2.13.0), so both
# capture paths and the third-party models are tested on every submission; `make venv-lowest` builds
# build/venv-lowest (pandas 2.2.0, pyarrow 14, plotly 5.20, no torch), where one test loads a saved run.
PYTHON ?= python3
VENV ?= .venv
VENV214 ?= .venv214
# The lowest pandas/numpy/pyarrow/plotly/psutil pyproject allows, without torch: tests/test_lowest_pandas.py
# loads a saved run there (tables/, diagnose/ and output/ are torch-free). numpy<2: pyarrow 14 needs it.
VENVLOW ?= build/venv-lowest
BIN = $(VENV)/bin
BIN214 = $(VENV214)/bin

.PHONY: demo test venv venv214 venv-lowest clean

$(BIN)/gradprobe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,integrations]"
	touch $@

$(BIN214)/gradprobe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV214)
	$(BIN214)/pip install -q --upgrade pip
	$(BIN214)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN214)/pip install -q -e ".[test,integrations]"
	touch $@

$(VENVLOW)/gradprobe-installed: pyproject.toml
	$(PYTHON) -m venv $(VENVLOW)
	$(VENVLOW)/bin/pip install -q "pandas==2.2.0" "numpy==1.26.*" "pyarrow==14.0.*" "plotly==5.20.*" "psutil==5.9.*"
	touch $@

venv: $(BIN)/gradprobe-installed

venv214: $(BIN214)/gradprobe-installed

venv-lowest: $(VENVLOW)/gradprobe-installed

demo: venv
	$(BIN)/gradprobe demo -o report.html

test: venv venv214 venv-lowest
	$(BIN)/python -m pytest -q
	$(BIN214)/python -m pytest -q

clean:
	rm -rf $(VENV) $(VENV214) $(VENVLOW) report.html
