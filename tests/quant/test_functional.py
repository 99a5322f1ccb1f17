"""The quantizers: SPEC §1 worked vectors, an autograd-free recomputation, and the torchao oracle."""

from __future__ import annotations

import math

import pytest
import torch

from paretoq.quant.functional import SCHEMES, dequantize_codes, fake_quantize, init_scale, quantize_codes

BITS = [1, 1.58, 2, 3, 4]


def _fq(bits, W, alpha, grad=None):
    w = torch.tensor(W, dtype=torch.float32).reshape(1, -1).requires_grad_()
    a = torch.full((1, 1), float(alpha), requires_grad=True)
    out = fake_quantize(w, a, SCHEMES[bits])
    out.backward(torch.ones_like(out) if grad is None else grad)
    return out.detach()[0], w.grad[0], a.grad


# SPEC §1 worked vectors: (bits, α, W, Ŵ, weight-gradient mask, α-coefficient per element)
WORKED = [
    (2, 1.0, [-1.2, -0.6, -0.2, 0, 0.3, 0.51, 0.98, 1.5],
     [-.75, -.75, -.25, .25, .25, .75, .75, .75], [0, 1, 1, 1, 1, 1, 1, 0],
     [-.75, -.15, -.05, .25, -.05, .24, -.23, .75]),
    (1.58, 1.0, [-0.9, -0.34, -0.2, 0, 0.33, 0.5, 1.2],
     [-2 / 3, -2 / 3, 0, 0, 0, 2 / 3, 2 / 3], [1, 1, 1, 1, 1, 1, 0],
     [.2333, -.3267, .2, 0, -.33, .1667, 1.0]),
    (4, 0.1, [-0.9, -0.84, 0.26, 0.75, 0.8],
     [-0.8, -0.8, 0.3, 0.7, 0.7], [0, 0, 1, 0, 0], [-8, -8, 0.4, 7, 7]),
]


@pytest.mark.parametrize("bits, alpha, W, W_hat, mask, coef", WORKED)
def test_worked_vectors(bits, alpha, W, W_hat, mask, coef):
    out, gw, ga = _fq(bits, W, alpha)
    assert torch.allclose(out, torch.tensor(W_hat), atol=1e-6)
    assert gw.tolist() == [float(m) for m in mask]
    s_g = 1 / math.sqrt(len(W) * SCHEMES[bits].grad_qp)
    assert ga.item() == pytest.approx(s_g * sum(coef), abs=1e-3 * s_g)
    # per element: feed a one-hot gradient to read each coefficient separately
    for j, c in enumerate(coef):
        g = torch.zeros(1, len(W))
        g[0, j] = 1.0
        _, _, ga_j = _fq(bits, W, alpha, grad=g)
        assert ga_j.item() / s_g == pytest.approx(c, abs=1e-4)


def test_binary_worked():
    out, gw, ga = _fq(1, [-2.0, -0.5, 0.0, 0.3, 1.5], 0.5)
    assert out.tolist() == [-0.5, -0.5, 0.0, 0.5, 0.5]
    assert gw.tolist() == [0, 1, 1, 1, 0]  # x = W/α = [-4, -1, 0, .6, 3]: |x| ≤ 1 passes
    assert ga.item() == pytest.approx((-1 - 1 + 0 + 1 + 1) / math.sqrt(5))


def _independent(bits, W, A, G):
    """Forward and both gradients from the formulas, elementwise in float64 Python (no autograd)."""
    sch = SCHEMES[bits]
    m, n = W.shape
    groups = A.shape[1]
    gs = n // groups
    s_g = 1 / math.sqrt(m * n * sch.grad_qp)
    out = torch.zeros(m, n, dtype=torch.float64)
    gw = torch.zeros(m, n, dtype=torch.float64)
    ga = torch.zeros(m, groups, dtype=torch.float64)
    levels = sch.levels().double()
    for i in range(m):
        for j in range(n):
            a = max(float(A[i, j // gs]), 1e-5)
            w = float(W[i, j])
            x = w / a
            if sch.name == "binary":
                q = math.copysign(1.0, w) if w != 0 else 0.0
                coef = q
            else:
                if sch.name == "lsq":
                    q = min(max(round(x), sch.qn), sch.qp)
                else:  # SEQ: nearest level of the clipped, stretched value
                    xc = min(max(x, -0.99), 0.99)
                    q = (round(xc * sch.k - sch.sigma) + sch.sigma) / sch.k
                assert any(abs(q - float(lv)) < 1e-6 for lv in levels)
                sat = sch.qp if sch.name == "lsq" else (sch.k - sch.sigma) / sch.k
                sat_lo = sch.qn if sch.name == "lsq" else -sat
                coef = sat_lo if x < sch.lo else sat if x > sch.hi else q - x
            inside = sch.lo <= x <= sch.hi
            out[i, j] = q * a
            gw[i, j] = float(G[i, j]) if inside else 0.0
            ga[i, j // gs] += coef * float(G[i, j]) * s_g
    return out, gw, ga


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 4])
def test_against_independent_computation(bits, group):
    torch.manual_seed(int(bits * 100))
    W = torch.randn(6, 16) * 0.05
    A = init_scale(W, SCHEMES[bits], group) * torch.empty(6, 16 // (group or 16)).uniform_(0.6, 1.2)
    G = torch.randn(6, 16)
    w = W.clone().requires_grad_()
    a = A.clone().requires_grad_()
    out = fake_quantize(w, a, SCHEMES[bits])
    out.backward(G)
    ref_out, ref_gw, ref_ga = _independent(bits, W, A, G)
    assert torch.allclose(out.double(), ref_out, atol=1e-6)
    assert torch.equal(w.grad.double(), ref_gw)
    assert torch.allclose(a.grad.double(), ref_ga, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bits", BITS)
def test_group_equal_to_row_is_per_row_bit_for_bit(bits):
    torch.manual_seed(1)
    W = torch.randn(8, 64)
    sch = SCHEMES[bits]
    a_row = init_scale(W, sch, None)
    a_grp = init_scale(W, sch, 64)
    assert torch.equal(a_row, a_grp)
    G = torch.randn(8, 64)
    res = []
    for a0 in (a_row, a_grp):
        w = W.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        out = fake_quantize(w, a, sch)
        out.backward(G)
        res.append((out, w.grad, a.grad))
    for x, y in zip(*res):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_group_scales_receive_gradients(bits, group):
    torch.manual_seed(2)
    W = torch.randn(16, 256) * 0.02
    a = init_scale(W, SCHEMES[bits], group).requires_grad_()
    assert a.shape == (16, 256 // group)
    out = fake_quantize(W.requires_grad_(), a, SCHEMES[bits])
    (out * torch.randn_like(out)).sum().backward()
    assert a.grad.shape == a.shape
    assert (a.grad != 0).float().mean() > 0.9  # nearly every group's scale gets a gradient


@pytest.mark.parametrize("bits", BITS)
def test_reference_scale_init(bits):
    W = torch.tensor([[0.5, -2.0, 1.0, 0.5]])
    a = init_scale(W, SCHEMES[bits], None).item()
    expected = {1: 1.0, 1.58: 2.0, 2: 2.0, 3: 2.0 / 3, 4: 2.0 / 7}[bits]
    assert a == pytest.approx(expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 16])
def test_codes_round_trip_the_fake_quant_weight(bits, group):
    torch.manual_seed(3)
    W = torch.randn(12, 64) * 0.1
    a = init_scale(W, SCHEMES[bits], group) * 0.9
    codes = quantize_codes(W, a, SCHEMES[bits])
    assert codes.dtype == torch.uint8 and int(codes.max()) < SCHEMES[bits].n_levels
    assert torch.equal(dequantize_codes(codes, a, SCHEMES[bits]), fake_quantize(W, a, SCHEMES[bits]))


def test_scale_floor():
    out, _, _ = _fq(4, [0.001, -0.003], 0.0)  # α̃ = 1e-5 → clamp to the grid ends
    assert torch.allclose(out, torch.tensor([7e-5, -8e-5]))
