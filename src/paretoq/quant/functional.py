"""The ParetoQ weight quantizers: the math, in one place.

Reference: Liu et al., "ParetoQ: Scaling Laws in Extremely Low-bit LLM Quantization",
arXiv 2502.02631, and its public code (`utils_quant.py`: `LsqBinaryTernaryExtension`,
`StretchedElasticQuant`). The forward and backward below reproduce that code bit for bit in
fp32, quirks included (see ``SPEC.md`` §1 of the project):

Notation: W (m×n) a Linear weight, α the learnable scale (`weight_clip_val`), one per output
row (shape (m, 1)) or one per group of ``g`` consecutive input columns (shape (m, n/g)).
α̃ = max(α, 1e-5); x = W / α̃; N = numel(W) of the *whole* matrix; round = half-to-even.

==========  =========================  ==========================================
bits        scheme                     forward Ŵ = α̃ · q(x)
==========  =========================  ==========================================
1           binary                     q = sign(x)                 levels {−1, +1}
1.58        SEQ, k = 1.5, σ = 0        q = (round(clamp(x,−c,c)·k − σ) + σ) / k,
2           SEQ, k = 2,   σ = 0.5      c = 0.99                     {−2/3,0,2/3} / {±1/4,±3/4}
3, 4        LSQ, Qn = −2^(b−1),        q = clamp(round(x), Qn, Qp)  integers Qn..Qp
            Qp = 2^(b−1) − 1
==========  =========================  ==========================================

Backward: ∂L/∂W = M ⊙ g, where M = 1 inside the scheme's clip range [lo, hi] and 0 outside
(straight-through estimator); ∂L/∂α = s_g · Σ_row/group (coef ⊙ g) with s_g = 1/√(N·Qp_grad):
- binary: coef = sign(W) (no mask);
- LSQ / SEQ: coef = S·sat_lo + B·sat_hi + M·(q(x) − x) with S = [x < lo], B = [x > hi].
  For SEQ the saturation coefficients are ±(k − σ)/k: ±0.75 at 2 bits and ±1.0 at ternary
  (not the ternary level 2/3 — the reference does it, so do we). Qp_grad is the LSQ Qp of the
  integer bit count (1 for bits 1, 1.58 and 2; 3 and 7 for bits 3 and 4).

Every scheme is a small object with the same methods; ``SCHEMES`` maps bits → scheme. Nothing
else in paretoq branches on the bit width.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

SCALE_EPS = 1e-5  # α̃ = max(α, SCALE_EPS), as in the reference
SEQ_CLIP = 1 - 1e-2  # c in the SEQ formula (the reference writes `1 - 1e-2`)


class Scheme(ABC):
    """One weight-quantization scheme. Subclasses fill in the formulas of the module docstring."""

    name: str
    bits: float  # the bit width users write (1, 1.58, 2, 3, 4)
    grad_qp: float  # Qp inside the gradient scale 1/sqrt(N * Qp)
    lo: float  # clip range of x = W / α̃ for the straight-through mask
    hi: float
    n_levels: int  # number of distinct normalised levels (code range is 0..n_levels-1)
    code_bits: int  # bits of one packed code

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised quantized value q(x) (the forward without the α̃ factor)."""

    @abstractmethod
    def scale_coefficient(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-element coefficient c with ∂L/∂α = s_g · Σ c ⊙ g."""

    @abstractmethod
    def init_scale(self, w_grouped: torch.Tensor) -> torch.Tensor:
        """Reference scale init from the weight, reduced over the last dim (keepdim)."""

    @abstractmethod
    def levels(self) -> torch.Tensor:
        """The normalised levels q can take, ascending; code i stands for levels()[i]."""

    # -- shared by every scheme -------------------------------------------------------------
    def ste_mask(self, x: torch.Tensor) -> torch.Tensor:
        """M = 1 − [x < lo] − [x > hi], as the float mask the reference computes."""
        small = (x < self.lo).float()
        big = (x > self.hi).float()
        return 1.0 - small - big

    def to_codes(self, q: torch.Tensor) -> torch.Tensor:
        """Map normalised levels (output of ``quantize``) to integer codes 0..n_levels-1."""
        return torch.bucketize(q, self._midpoints(q)).to(torch.uint8)

    def from_codes(self, codes: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Map integer codes back to the normalised levels."""
        return self.levels().to(dtype=dtype, device=codes.device)[codes.long()]

    def _midpoints(self, like: torch.Tensor) -> torch.Tensor:
        lv = self.levels().to(device=like.device, dtype=like.dtype)
        return (lv[1:] + lv[:-1]) / 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits})"


@dataclass(frozen=True, repr=False)
class Binary(Scheme):
    """1-bit: Ŵ = α̃·sign(W); ∂L/∂α = s_g Σ sign(W)·g; STE mask |x| ≤ 1. Init: mean|W|.

    Exact zeros in W give q = 0 in fake-quant (torch.sign); packed 1-bit files store them as +1
    (there is no zero level in one bit) — a documented difference that trained weights never hit.
    """

    bits: float = 1
    name: str = "binary"
    grad_qp: float = 1.0
    lo: float = -1.0
    hi: float = 1.0
    n_levels: int = 2
    code_bits: int = 1

    def quantize(self, x):
        return x.sign()

    def scale_coefficient(self, x, w):
        return w.sign()

    def init_scale(self, w_grouped):
        return w_grouped.abs().mean(dim=-1, keepdim=True)

    def levels(self):
        return torch.tensor([-1.0, 1.0])

    def to_codes(self, q):
        return (q >= 0).to(torch.uint8)


@dataclass(frozen=True, repr=False)
class StretchedElastic(Scheme):
    """SEQ (ParetoQ §3): q(x) = (round(clamp(x, −c, c)·k − σ) + σ) / k. Init: max|W|."""

    bits: float
    k: float  # n_levels in the reference code
    sigma: float  # shift
    grad_qp: float = 1.0
    name: str = "seq"
    lo: float = -SEQ_CLIP
    hi: float = SEQ_CLIP
    n_levels: int = 0
    code_bits: int = 2

    @property
    def saturation(self) -> float:
        return (self.k - self.sigma) / self.k

    def quantize(self, x):
        return (torch.round(torch.clamp(x, -SEQ_CLIP, SEQ_CLIP) * self.k - self.sigma) + self.sigma) / self.k

    def scale_coefficient(self, x, w):
        small = (x < self.lo).float()
        big = (x > self.hi).float()
        middle = 1.0 - small - big
        return small * -self.saturation + big * self.saturation + middle * (-x + self.quantize(x))

    def init_scale(self, w_grouped):
        return w_grouped.abs().amax(dim=-1, keepdim=True)

    def levels(self):
        lo = round(-SEQ_CLIP * self.k - self.sigma)
        hi = round(SEQ_CLIP * self.k - self.sigma)
        return torch.tensor([(i + self.sigma) / self.k for i in range(lo, hi + 1)], dtype=torch.float64).float()


@dataclass(frozen=True, repr=False)
class LSQ(Scheme):
    """LSQ (Esser et al. 2020, as in ParetoQ): q(x) = clamp(round(x), Qn, Qp).

    Init: max|W| / Qp (the reference's max|W| / (2^(b−1) − 1)).
    """

    bits: float
    qn: int = 0
    qp: int = 0
    name: str = "lsq"
    grad_qp: float = 0.0
    lo: float = 0.0
    hi: float = 0.0
    n_levels: int = 0
    code_bits: int = 0

    def quantize(self, x):
        return x.round().clamp(self.qn, self.qp)

    def scale_coefficient(self, x, w):
        small = (x < self.qn).float()
        big = (x > self.qp).float()
        middle = 1.0 - small - big
        return small * self.qn + big * self.qp + middle * (-x + x.round())

    def init_scale(self, w_grouped):
        return w_grouped.abs().amax(dim=-1, keepdim=True) / self.qp

    def levels(self):
        return torch.arange(self.qn, self.qp + 1, dtype=torch.float32)

    def to_codes(self, q):
        return (q - self.qn).round().to(torch.uint8)


def _lsq(bits: int) -> LSQ:
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return LSQ(bits=bits, qn=qn, qp=qp, grad_qp=float(qp), lo=float(qn), hi=float(qp), n_levels=qp - qn + 1, code_bits=bits)


SCHEMES: dict[float, Scheme] = {
    1: Binary(),
    1.58: StretchedElastic(bits=1.58, k=1.5, sigma=0.0, n_levels=3, code_bits=2),
    2: StretchedElastic(bits=2, k=2.0, sigma=0.5, n_levels=4, code_bits=2),
    3: _lsq(3),
    4: _lsq(4),
}
"""bits as users write them → scheme. 16 (or more) means "not quantized" and has no entry."""


def _grouped(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View W (m, n) as (m, n/g, g) and α (m, G) as (m, G, 1) when there are several groups.

    Per-row scales (m, 1) keep the 2-D layout of the reference so its reduction order (and so
    its bits) is reproduced exactly.
    """
    m, n = weight.shape
    groups = scale.shape[-1]
    if groups == 1:
        return weight, scale
    return weight.reshape(m, groups, n // groups), scale.unsqueeze(-1)


class FakeQuantize(torch.autograd.Function):
    """Ŵ = α̃·q(W/α̃) with the straight-through / LSQ gradients of the module docstring."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme):
        w, a = _grouped(weight, scale)
        a = torch.where(a > SCALE_EPS, a, torch.tensor(SCALE_EPS, device=a.device, dtype=a.dtype))
        ctx.scheme = scheme
        ctx.save_for_backward(weight, scale)
        return (scheme.quantize(w / a) * a).reshape(weight.shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale = ctx.saved_tensors
        scheme: Scheme = ctx.scheme
        w, a = _grouped(weight, scale)
        a = torch.where(a > SCALE_EPS, a, torch.tensor(SCALE_EPS, device=a.device, dtype=a.dtype))
        g = grad_output.reshape(w.shape)
        x = w / a
        grad_scale_factor = 1.0 / math.sqrt(weight.numel() * scheme.grad_qp)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (scheme.scale_coefficient(x, w) * g * grad_scale_factor).sum(dim=-1, keepdim=True)
            grad_alpha = grad_alpha.reshape(scale.shape)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = (scheme.ste_mask(x) * g).reshape(weight.shape)
        return grad_weight, grad_alpha, None


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Differentiable fake quantization of ``weight`` (m, n) with scales (m, G), G | n."""
    return FakeQuantize.apply(weight, scale, scheme)


@torch.no_grad()
def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Integer codes (uint8, shape of ``weight``) of the fake-quantized weight."""
    w, a = _grouped(weight.float(), scale.float())
    a = a.clamp_min(SCALE_EPS)
    return scheme.to_codes(scheme.quantize(w / a)).reshape(weight.shape)


@torch.no_grad()
def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, scheme: Scheme, dtype=torch.float32) -> torch.Tensor:
    """Ŵ from integer codes and scales: α̃ · levels[codes]."""
    m, n = codes.shape
    q = scheme.from_codes(codes, dtype=torch.float32)
    w, a = _grouped(q, scale.float())
    a = a.clamp_min(SCALE_EPS)
    return (w * a).reshape(m, n).to(dtype)


@torch.no_grad()
def init_scale(weight: torch.Tensor, scheme: Scheme, group_size: int | None) -> torch.Tensor:
    """Reference scale init per row (group_size None) or per group: shape (m, n/g)."""
    m, n = weight.shape
    g = n if group_size is None else group_size
    return scheme.init_scale(weight.detach().float().reshape(m, n // g, g)).reshape(m, n // g)
