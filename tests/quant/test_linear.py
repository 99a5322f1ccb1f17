"""`QuantLinear` without a cast (fp32 compute on fp32 weights): Ŵ is recomputed in backward rather
than kept, with bit for bit the output and gradients of ``F.linear(x, fake_quantize(W, α))``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paretoq.quant import QuantConfig
from paretoq.quant.functional import fake_quantize
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
