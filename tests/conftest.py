"""Shared test helpers: where the project's fixtures live, small model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARETOQ_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures" / "minicpm4-tiny"
TEXT = SHARED / "fixtures" / "text"

torch.set_num_threads(min(2, torch.get_num_threads()))

# `paretoq train` fuses the quantizer with torch.compile on CPU by default (--compile_quantizer auto):
# seconds of compiling in every training process. The suite trains with the eager quantizer unless
# told otherwise (PARETOQ_COMPILE_QUANTIZER=auto|true runs it all fused); the fused path and the
# auto default have tests of their own (tests/quant/test_compiled.py, tests/training/test_recipe.py).
os.environ.setdefault("PARETOQ_COMPILE_QUANTIZER", "false")


@pytest.fixture(scope="session")
def prebuilt_kernels():
    """The CPU kernels (``paretoq.quant.prebuilt``) the quantizer tests call, built up front in parallel
    child processes (minutes on a machine that never built them, then read from the disk cache):
    every scheme's forward and short-row backward, fp32 and bf16."""
    from paretoq.quant import compiled
    from paretoq.quant.functional import SCHEMES

    f32 = torch.float32
    calls = []
    for scheme in SCHEMES.values():
        for dtype in (f32, torch.bfloat16):
            calls += [(compiled.FORWARD_CPU, (f32, f32, scheme, dtype)),
                      (compiled.BACKWARD_CPU, (f32, f32, scheme, dtype, f32, False))]
    from paretoq.quant import prebuilt

    prebuilt.prepare(calls)


@pytest.fixture
def fused(prebuilt_kernels):
    """The fused quantizer on (CPU: the kernels built ahead of time), off again afterwards."""
    from paretoq.quant import compiled

    compiled.enable(True)
    yield
    compiled.enable(False)


@pytest.fixture
def fixture_dir() -> Path:
    if not FIXTURE.is_dir():
        pytest.fail(f"fixture folder missing: {FIXTURE} (set PARETOQ_SHARED to the shared/ folder)")
    return FIXTURE


@pytest.fixture
def text_dir() -> Path:
    return TEXT


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0):
    """A tiny random LlamaForCausalLM built in code (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()
