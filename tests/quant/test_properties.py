"""Property-based tests of the quantizers (hypothesis), for every scheme, per row and per group.

For any weight W and positive scales α (including scales below the 1e-5 floor):
- codes lie in 0 .. n_levels−1 (uint8);
- Ŵ = fake_quantize(W, α) takes only the scheme's levels times α̃ = max(α, 1e-5) (binary: also 0
  where W is exactly 0, the documented sign(0) case), and the codes decode to the same Ŵ;
- fake-quantizing is idempotent: fake_quantize(Ŵ, α) == Ŵ bit for bit, and Ŵ has the same codes;
- per-group scales that repeat one value per row give exactly the per-row result.
Packing properties live in tests/quant/test_packing.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from paretoq.quant.functional import SCALE_EPS, SCHEMES, dequantize_codes, fake_quantize, quantize_codes

BITS = sorted(SCHEMES)
PROFILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_weights = st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False, width=32)
scale_values = st.one_of(st.floats(2.0**-10, 20.0, width=32), st.sampled_from([0.0, 1e-7, SCALE_EPS, 2e-5]))


@st.composite
def weight_and_scale(draw):
    """(W (m, n) fp32, α (m, G) fp32, G) with G = 1 (per row) or n / g groups of g columns."""
    rows = draw(st.integers(1, 6))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    groups = draw(st.integers(1, 4))
    per_row = draw(st.booleans())
    n = group * groups
    w = draw(arrays(np.float32, (rows, n), elements=finite_weights))
    # mix in values sitting exactly on level boundaries and zeros, where rounding decisions happen
    if draw(st.booleans()):
        special = draw(arrays(np.float32, (rows, n), elements=st.sampled_from(
            [0.0, 0.5, -0.5, 1.0, -1.0, 0.25, 1.5, -2.5, 7.5, -8.5, 0.99, -0.99])))
        w = np.where(draw(arrays(np.bool_, (rows, n))), special, w)
    g = 1 if per_row else groups
    alpha = draw(arrays(np.float32, (rows, g), elements=scale_values))
    return torch.from_numpy(w.copy()), torch.from_numpy(alpha.copy())


def _alpha_tilde(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """α̃ broadcast to W's shape."""
    a = torch.where(alpha > SCALE_EPS, alpha, torch.tensor(SCALE_EPS))
    return a.repeat_interleave(w.shape[1] // alpha.shape[1], dim=1)


@pytest.mark.parametrize("bits", BITS)
@PROFILE
@given(data=weight_and_scale())
def test_codes_in_range(bits, data):
    w, alpha = data
    scheme = SCHEMES[bits]
    codes = quantize_codes(w, alpha, scheme)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) < scheme.n_levels


@pytest.mark.parametrize("bits", BITS)
@PROFILE
@given(data=weight_and_scale())
def test_levels_only_from_the_grid(bits, data):
    w, alpha = data
    scheme = SCHEMES[bits]
    w_hat = fake_quantize(w, alpha, scheme)
    a = _alpha_tilde(w, alpha)
    levels = scheme.levels()
    allowed = levels * a.unsqueeze(-1)  # (m, n, n_levels): every value Ŵ may take at each position
    hit = (w_hat.unsqueeze(-1) == allowed).any(-1)
    if bits == 1:  # sign(0) = 0: an exactly-zero weight stays 0 in fake-quant (documented)
        hit |= (w == 0) & (w_hat == 0)
    assert bool(hit.all()), w_hat[~hit]
    # the codes decode to the same Ŵ (except binary zeros, which have no code)
    decoded = dequantize_codes(quantize_codes(w, alpha, scheme), alpha, scheme)
    keep = ~(w == 0) if bits == 1 else torch.ones_like(w, dtype=torch.bool)
    assert torch.equal(decoded[keep], w_hat[keep])


@pytest.mark.parametrize("bits", BITS)
@PROFILE
@given(data=weight_and_scale())
def test_fake_quantize_is_idempotent(bits, data):
    w, alpha = data
    scheme = SCHEMES[bits]
    w_hat = fake_quantize(w, alpha, scheme)
    again = fake_quantize(w_hat, alpha, scheme)
    assert torch.equal(again, w_hat)
    assert torch.equal(quantize_codes(w_hat, alpha, scheme)[w != 0], quantize_codes(w, alpha, scheme)[w != 0])


@pytest.mark.parametrize("bits", BITS)
@PROFILE
@given(data=weight_and_scale(), groups=st.sampled_from([1, 2, 4]))
def test_repeated_group_scales_equal_per_row(bits, data, groups):
    w, alpha = data
    row_alpha = alpha[:, :1]
    w = w.repeat(1, groups)
    scheme = SCHEMES[bits]
    per_row = fake_quantize(w, row_alpha, scheme)
    per_group = fake_quantize(w, row_alpha.repeat(1, groups), scheme)
    assert torch.equal(per_row, per_group)
    assert torch.equal(quantize_codes(w, row_alpha, scheme), quantize_codes(w, row_alpha.repeat(1, groups), scheme))


def test_binary_codes_of_a_denormal_weight_follow_the_forward():
    """Found by hypothesis: W = -1.4e-45 with α = 2 — W/α underflows to -0, but Ŵ = α·sign(W) = -2."""
    w = torch.tensor([[-1.4013e-45, 3e-45]])
    alpha = torch.tensor([[2.0]])
    scheme = SCHEMES[1]
    assert fake_quantize(w, alpha, scheme).tolist() == [[-2.0, 2.0]]
    assert quantize_codes(w, alpha, scheme).tolist() == [[0, 1]]
