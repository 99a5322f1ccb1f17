"""Bit-exact agreement with the reference quantizers as shipped in torchao 0.18 (dev-only oracle).

paretoq's own code never imports torchao; this test does, to prove the forward output and both
gradients are identical in fp32 on random weights of several shapes, for every bit width.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO
from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale

# `make test` installs torchao==0.18.0 into .oracle/ (outside the venv); load its reference file alone.
_REF = REPO / ".oracle" / "torchao" / "prototype" / "paretoq" / "models" / "utils_quant.py"
if not _REF.is_file():
    pytest.fail(f"reference oracle missing: {_REF} (run `make install`)", pytrace=False)
_spec = importlib.util.spec_from_file_location("paretoq_reference_utils_quant", _REF)
utils_quant = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(utils_quant)

# the reference's bit codes: 0 = ternary
REF_CODE = {1: 1, 1.58: 0, 2: 2, 3: 3, 4: 4}
SHAPES = [(8, 16), (33, 70), (64, 128), (5, 1000)]


def _ref(bits, W, A, G):
    fn = utils_quant.StretchedElasticQuant if REF_CODE[bits] in (0, 2) else utils_quant.LsqBinaryTernaryExtension
    w = W.clone().requires_grad_()
    a = A.clone().requires_grad_()
    out = fn.apply(w, a, REF_CODE[bits], False)
    out.backward(G)
    return out.detach(), w.grad, a.grad


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_equal_to_reference_exactly(bits, shape):
    torch.manual_seed(hash((bits, shape)) % 2**31)
    W = torch.randn(*shape) * 0.02
    A = init_scale(W, SCHEMES[bits], None) * torch.empty(shape[0], 1).uniform_(0.5, 1.5)
    A[0] = 1e-7  # exercise the α floor
    G = torch.randn(*shape)
    w = W.clone().requires_grad_()
    a = A.clone().requires_grad_()
    out = fake_quantize(w, a, SCHEMES[bits])
    out.backward(G)
    r_out, r_gw, r_ga = _ref(bits, W, A, G)
    assert torch.equal(out.detach(), r_out)
    assert torch.equal(w.grad, r_gw)
    assert torch.equal(a.grad, r_ga)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 3, 4])
def test_quantize_linear_module_equal(bits):
    """Our QuantLinear vs the reference QuantizeLinear on the same weight and scale init."""
    from paretoq.quant import QuantConfig, QuantLinear

    torch.manual_seed(7)
    lin = torch.nn.Linear(96, 40, bias=False)
    ours = QuantLinear.from_linear(torch.nn.Linear(96, 40, bias=False), QuantConfig(w_bits=bits))
    ours.weight.data.copy_(lin.weight.data)
    ours.reset_scale()
    ref = utils_quant.QuantizeLinear(96, 40, w_bits=REF_CODE[bits])
    ref.weight.data.copy_(lin.weight.data)
    ref.weight_clip_val.data.copy_(ours.weight_clip_val.data)
    x = torch.randn(3, 7, 96)
    y_ours, y_ref = ours(x), ref(x)
    assert torch.equal(y_ours, y_ref)
    y_ours.square().sum().backward()
    y_ref.square().sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad)
    assert torch.equal(ours.weight_clip_val.grad, ref.weight_clip_val.grad)
