"""QuantConfig validation, QuantLinear.from_linear and quantize_model / dequantize_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from paretoq import QuantConfig, QuantLinear, dequantize_model, quantize_model
from paretoq.errors import UserError
from paretoq.quant import QuantConfigError, parse_bits


@pytest.mark.parametrize("spelling, bits", [(1, 1), ("1.58", 1.58), (1.58, 1.58), (0, 1.58), ("2", 2), (3.0, 3),
                                            (4, 4), (16, 16), (32, 16), ("32", 16)])
def test_bits_spellings(spelling, bits):
    assert parse_bits(spelling) == bits
    assert QuantConfig(w_bits=spelling).enabled == (bits != 16)


@pytest.mark.parametrize("bad", [5, 1.5, -1, 8, "two", None])
def test_unknown_bits_say_the_fix(bad):
    with pytest.raises(QuantConfigError, match=r"w_bits .* use one of 1, 1\.58, 2, 3, 4"):
        QuantConfig(w_bits=bad)


@pytest.mark.parametrize("bad", [0, -32, 2.5, True])
def test_bad_group_size(bad):
    with pytest.raises(QuantConfigError, match="group_size must be a positive integer"):
        QuantConfig(w_bits=2, group_size=bad)


def test_group_size_not_dividing_names_the_layer_and_changes_nothing():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"group_size 48 does not divide in_features 64 of layer "
                                        r"model\.layers\.0\.self_attn\.q_proj: choose a divisor of 64"):
        quantize_model(model, QuantConfig(w_bits=2, group_size=48))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_default_selection_is_the_seven_projections_of_every_layer():
    model = tiny_llama(layers=3)
    report = quantize_model(model, QuantConfig(w_bits=2))
    assert report.num_layers == 21
    suffixes = sorted({n.rsplit(".", 1)[1] for n in report.layers})
    assert suffixes == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    expected = sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantLinear))
    assert report.quantized_params == expected
    assert model.config.quantization_config["w_bits"] == 2
    assert "21 Linear layers" in str(report)


def test_patterns_select_other_layers():
    model = tiny_llama(layers=2)
    cfg = QuantConfig(w_bits=4, include=[r"mlp\."], exclude=[r"down_proj"])
    report = quantize_model(model, cfg)
    assert sorted({n.rsplit(".", 1)[1] for n in report.layers}) == ["gate_proj", "up_proj"]
    assert report.num_layers == 4


def test_from_linear_reuses_weight_keeps_bias_and_inits_scale():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=True)
    q = QuantLinear.from_linear(lin, QuantConfig(w_bits=3, group_size=16))
    assert q.weight is lin.weight and q.bias is lin.bias
    assert q.weight_clip_val.shape == (8, 2) and q.weight_clip_val.dtype == torch.float32
    expected = lin.weight.detach().reshape(8, 2, 16).abs().amax(-1) / 3
    assert torch.equal(q.weight_clip_val.detach(), expected)
    x = torch.randn(4, 32)
    y = q(x)
    w_hat = q.quantized_weight()
    assert torch.allclose(y, x @ w_hat.T + lin.bias, atol=1e-6)


def test_off_bits_change_nothing():
    model = tiny_llama()
    report = quantize_model(model, QuantConfig(w_bits=16))
    assert report.num_layers == 0 and not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
def test_dequantize_model_bakes_identical_logits(bits):
    model = tiny_llama()
    quantize_model(model, QuantConfig(w_bits=bits, group_size=32))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        fake = model(ids).logits
        dequantize_model(model)
        baked = model(ids).logits
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.equal(fake, baked)


def test_quantized_model_trains_scales_and_weights():
    model = tiny_llama()
    quantize_model(model, QuantConfig(w_bits=2))
    ids = torch.randint(0, 128, (2, 12))
    model(ids, labels=ids).loss.backward()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
            assert m.weight_clip_val.grad is not None and m.weight_clip_val.grad.abs().sum() > 0
