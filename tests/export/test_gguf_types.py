"""GGUF types and 8-bit activation blocks: llama.cpp rounds a layer's input to Q8_0 (blocks of 32) or Q8_K (256)
depending on the weight's type; a model trained with ``a_group_size`` gets the types that round as it trained."""

from __future__ import annotations

import logging

import pytest
import torch

from paretoq.export.gguf import BLOCK_TYPES, export_gguf, ggml_type_for
from paretoq.export.integers import LayerIntegers
from paretoq.quant.functional import SCHEMES, gguf_activation_block
from test_gguf import TOKENIZER, _check_exact
from test_gguf_mixed import MIX, WANT, _model


def test_activation_blocks_of_the_types():
    """ggml-cpu's vec_dot_type: Q8_0 for Q1_0 / Q2_0 / Q4_0 / Q8_0, Q8_K for the K and TQ types."""
    got = {name: bt.activation_block for name, bt in BLOCK_TYPES.items()}
    assert got == {"Q1_0": 32, "Q2_0": 32, "TQ2_0": 256, "TQ1_0": 256, "Q2_K": 256, "Q3_K": 256, "Q4_0": 32,
                   "Q8_0": 32}


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
def test_gguf_rule_is_the_exports_own_choice(bits):
    """``a_group_size="gguf"`` trains each layer with the block of the type the automatic choice writes."""
    grid = tuple(SCHEMES[bits].integer_grid[1])
    seen = set()
    for n in (256, 576, 1024, 1536):
        for group in (None, 32, 64, 128, 256, 512):
            if group is not None and n % group:
                continue
            groups = 1 if group is None else n // group
            q = LayerIntegers(torch.zeros(4, n, dtype=torch.int8), torch.ones(4, groups, dtype=torch.float64), grid,
                              bits)
            bt = ggml_type_for(q)
            if bt is None:
                continue
            seen.add(bt.name)
            assert bt.activation_block == gguf_activation_block(bits, group, n), (bits, group, n, bt.name)
    assert seen  # every bit width has exact types here
    if bits in (2, 3):
        assert {t.endswith("_K") for t in seen} == {True, False}  # both blocks occur: the rule is not constant


def _mix(**kw):
    """The mixed model of test_gguf_mixed (same weights and scales) with 8-bit activations set by ``kw``."""
    import dataclasses

    model = _model()
    for m in model.modules():
        if hasattr(m, "a_block"):
            layer = dataclasses.replace(m.quant_config, **kw)
            m.quant_config, m.a_block = layer, layer.activation_block("", m.in_features)
    model.config.quantization_config = dataclasses.replace(MIX, **kw).to_dict()
    return model


def test_trained_activation_block_steers_the_type(tmp_path, caplog):
    # a_group_size 32 (Q8_0 activations): the 2/3-bit layers go to Q4_0 (exact too) instead of Q2_K / Q3_K
    model = _mix(a_bits=8, a_group_size=32)
    path = export_gguf(model, tmp_path / "a32.gguf", tokenizer=TOKENIZER, float_type="f32")
    types = _check_exact(model, path)
    assert types == {k: "Q4_0" if v in ("Q2_K", "Q3_K") else v for k, v in WANT.items()}
    # "gguf": exactly the automatic choice (control: a32 differs from it)
    model = _mix(a_bits=8, a_group_size="gguf")
    assert _check_exact(model, export_gguf(model, tmp_path / "g.gguf", tokenizer=TOKENIZER, float_type="f32")) == WANT
    assert types != WANT
    # per token: no activation block to match, the automatic choice
    model = _mix(a_bits=8)
    assert _check_exact(model, export_gguf(model, tmp_path / "t.gguf", tokenizer=TOKENIZER, float_type="f32")) == WANT
    # 256 (Q8_K): ternary takes Q2_K (it holds −1, 0, 1); the 4-bit layers have no such type: Q4_0, with a
    # warning naming the mismatch
    model = _mix(a_bits=8, a_group_size=256)
    with caplog.at_level(logging.WARNING, logger="paretoq.export.gguf"):
        types = _check_exact(model, export_gguf(model, tmp_path / "k.gguf", tokenizer=TOKENIZER, float_type="f32"))
    assert types == {k: "Q2_K" if v == "Q2_0" else v for k, v in WANT.items()}
    assert ("model.layers.0.self_attn.q_proj was trained with 8-bit activations in blocks of 256, but its type "
            "Q4_0 makes llama.cpp round them in blocks of 32") in caplog.text
