"""GGUF export of a mixed-precision model (issue #31): each tensor in the exact type of its own layer's bits,
decoded bit for bit (gguf-py's decoders; Q1_0 / Q2_0 by read_gguf_tensors), and (llamacpp marker) run by llama.cpp."""

from __future__ import annotations

import pytest

from conftest import tiny_llama
from paretoq import QuantConfig, quantize_model
from paretoq.export.gguf import export_gguf
from test_gguf import LLAMA_CPP_RTOL, TOKENIZER, _check_exact, _export_with_wrong_rope_rows, _sharpen_attention, \
    assert_llama_cpp_logits

# layer 0: attention 4-bit, MLP 2-bit; layer 1: q/k ternary, the rest 3-bit (the default)
MIX = QuantConfig(w_bits=3, overrides=[(r"layers\.0\.self_attn", 4), (r"layers\.0\.mlp", 2),
                                       (r"layers\.1\.self_attn\.[qk]_proj", 1.58)])
WANT = {"blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q4_0", "blk.0.attn_v": "Q4_0", "blk.0.attn_output": "Q4_0",
        "blk.0.ffn_gate": "Q2_K", "blk.0.ffn_up": "Q2_K", "blk.0.ffn_down": "Q2_K",
        "blk.1.attn_q": "Q2_0", "blk.1.attn_k": "Q2_0", "blk.1.attn_v": "Q3_K", "blk.1.attn_output": "Q3_K",
        "blk.1.ffn_gate": "Q3_K", "blk.1.ffn_up": "Q3_K", "blk.1.ffn_down": "Q3_K"}


def _model():
    model = _sharpen_attention(tiny_llama(layers=2, hidden=256, vocab=512, seed=1))
    quantize_model(model, MIX)
    return model


def test_each_tensor_in_its_own_layers_exact_type(tmp_path):
    model = _model()
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, float_type="f32")
    types = _check_exact(model, path)
    assert types == WANT
    # control: the same model quantized uniformly at 3 bits has one type everywhere
    uniform = tiny_llama(layers=2, hidden=256, vocab=512, seed=1)
    quantize_model(uniform, QuantConfig(w_bits=3))
    path = export_gguf(uniform, tmp_path / "u.gguf", tokenizer=TOKENIZER, float_type="f32")
    assert set(_check_exact(uniform, path).values()) == {"Q3_K"}


@pytest.mark.llamacpp
def test_llama_cpp_runs_a_mixed_model(tmp_path, monkeypatch):
    model = _model()
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, float_type="f32")
    wrong = _export_with_wrong_rope_rows(monkeypatch, model, tmp_path / "w.gguf", tokenizer=TOKENIZER,
                                         float_type="f32")
    ours, theirs = assert_llama_cpp_logits(model, path, [5, 77, 300, 12, 400, 9, 100, 250], LLAMA_CPP_RTOL["tiny"],
                                           wrong)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.85
