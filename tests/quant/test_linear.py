"""`QuantLinear` without a cast (fp32 compute on fp32 weights): Ŵ is recomputed in backward rather
than kept, with bit for bit the output and gradients of ``F.linear(x, fake_quantize(W, α))``; under bf16
autocast: Ŵ is the fp32 Ŵ rounded once, and output and gradients are those of the same composition under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paretoq.quant import QuantConfig
from paretoq.quant.functional import dequantize_codes, fake_quantize, quantize_codes
from paretoq.quant.linear import QuantLinear


def _layer(bits, group, bias, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(64, 48, bias=bias)
    return QuantLinear.from_linear(base, QuantConfig(w_bits=bits, group_size=group))


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
@pytest.mark.parametrize("group,bias", [(None, True), (16, False)])
def test_recomputed_linear_gives_the_composed_gradients(bits, group, bias):
    layer = _layer(bits, group, bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 48)
    params = [x, layer.weight, layer.weight_clip_val] + ([layer.bias] if bias else [])

    out = layer(x)
    assert out.grad_fn.name().endswith("_RecomputedQuantLinearBackward")
    got = torch.autograd.grad(out, params, g)
    ref_out = F.linear(x, fake_quantize(layer.weight, layer.weight_clip_val, layer.scheme), layer.bias)
    ref = torch.autograd.grad(ref_out, params, g)
    assert torch.equal(out, ref_out)
    for name, a, b in zip(("x", "W", "alpha", "bias"), got, ref):
        assert torch.equal(a, b), name


def test_no_copy_of_the_quantized_weight_is_kept_for_backward():
    """Only x, W and α are saved: W and α are the parameters themselves, so the layer keeps nothing
    FP training would not (the composition keeps a full Ŵ per layer until backward)."""
    layer = _layer(2, None, True)
    x = torch.randn(2, 7, 64, requires_grad=True)
    owned = {t.untyped_storage().data_ptr() for t in (x, layer.weight, layer.weight_clip_val)}

    def saved_storages(fn):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn()
        return {t.untyped_storage().data_ptr() for t in seen}

    assert saved_storages(lambda: layer(x)) <= owned
    composed = saved_storages(lambda: F.linear(x, fake_quantize(layer.weight, layer.weight_clip_val, layer.scheme)))
    assert composed - owned  # the composition does keep Ŵ: the check above can tell


def test_autocast_keeps_the_cast_weight_path():
    layer = _layer(4, None, True)
    x = torch.randn(2, 3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and "Recomputed" not in out.grad_fn.name()


# --- under bf16 autocast, the recommended training mode -----------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
@pytest.mark.parametrize("group", [None, 16])
def test_bf16_quantized_weight_is_the_fp32_one_rounded_once(bits, group):
    """Ŵ in bf16 = the fp32 Ŵ rounded to bf16, bit for bit (what ``Ŵ.to(bf16)`` gives in the reference)."""
    layer = _layer(bits, group, True)
    w, a = layer.weight, layer.weight_clip_val
    exact = fake_quantize(w, a, layer.scheme).to(torch.bfloat16)
    got = fake_quantize(w, a, layer.scheme, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, exact)
    # Negative control: the scale rounded to bf16 before it multiplies the level, bf16(bf16(α̃)·level), is another
    # tensor, which the check above would reject; for binary (levels ±1) both roundings agree.
    twice = dequantize_codes(quantize_codes(w, a, layer.scheme), a.detach().bfloat16().float(), layer.scheme)
    assert torch.equal(twice.to(torch.bfloat16), exact) == (bits == 1)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
@pytest.mark.parametrize("group", [None, 16])
def test_autocast_output_and_gradients_are_the_autocast_composition(bits, group):
    """Under bf16 autocast a QuantLinear gives bit for bit the output and the gradients (x, W, α, bias) of
    ``F.linear(x, fake_quantize(W, α))`` under the same autocast: autocast casts the fp32 Ŵ and the bias to bf16."""
    layer = _layer(bits, group, True)
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 48).bfloat16()
    params = [x, layer.weight, layer.weight_clip_val, layer.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref_out = F.linear(x, fake_quantize(layer.weight, layer.weight_clip_val, layer.scheme), layer.bias)
    assert out.dtype == ref_out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    got, ref = torch.autograd.grad(out, params, g), torch.autograd.grad(ref_out, params, g)
    for name, a, b in zip(("x", "W", "alpha", "bias"), got, ref):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    # Negative control: the product in fp32, rounded to bf16 afterwards (autocast not honoured), is rejected.
    with torch.no_grad():
        fp32_then_cast = F.linear(x, fake_quantize(layer.weight, layer.weight_clip_val, layer.scheme), layer.bias)
    assert not torch.equal(fp32_then_cast.bfloat16(), ref_out)
