"""save_pretrained / from_pretrained of a fake-quant model keeps modules, scales and logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from paretoq import QuantConfig, QuantLinear, quantize_model


@pytest.mark.parametrize("bits, group", [(2, None), (1.58, 32), (4, 16)])
def test_fake_quant_round_trip_keeps_scales(tmp_path, bits, group):
    model = tiny_llama()
    quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(0.87)  # "trained" scales differ from any init
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "paretoq" and qc["format"] == "fake" and qc["version"] == 1
    assert qc["w_bits"] == bits and qc["group_size"] == group
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    q = again.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.weight_clip_val.dtype == torch.float32
    assert torch.equal(q.weight_clip_val, model.model.layers[1].mlp.down_proj.weight_clip_val)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
