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

Cost (the quantizer runs on every weight each step, so it is written for speed; the values stay
the reference's bits, checked against it in ``tests/quant/test_oracle_torchao.py``):
- forward saves only W and α (parameters: no memory) and writes Ŵ straight in the compute dtype
  (bf16 under autocast, rounded once from fp32 — the bits of ``Ŵ.to(bf16)``);
- backward recomputes x = W/α̃ (saving it would cost 4 bytes per weight until backward) and uses
  the identities coef = q − x·M (the saturation values are the end levels; ternary is patched)
  and clamp∘round = round∘clamp (LSQ), so it is ~12 elementwise ops instead of the reference's ~20;
- the ops run in place on blocks of rows that stay in the CPU cache (``BLOCK_ELEMENTS``), on
  fp32 operands only (bf16 gradients are converted once per block; mixed dtypes and bool masks
  take slow, unvectorised paths in PyTorch's CPU kernels).
The net effect is measured in ``benchmarks/quantizer_micro.py`` and ``benchmarks/qat_overhead.py``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction

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
    def quantize_(self, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q from c = clamp(x, lo, hi), computed in place in ``c``; ``w`` is the weight (binary uses it)."""

    def coefficient_(self, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The α-coefficient, in place in ``q``: q − x where ``mask`` (M, float 0/1) is 1, Q± where 0.

        For LSQ and 2-bit SEQ the saturation values Q± are the end levels themselves: q − x·M.
        """
        return q.addcmul_(x, mask, value=-1)

    @abstractmethod
    def init_scale(self, w_grouped: torch.Tensor) -> torch.Tensor:
        """Reference scale init from the weight, reduced over the last dim (keepdim)."""

    @abstractmethod
    def levels(self) -> torch.Tensor:
        """The normalised levels q can take, ascending; code i stands for levels()[i]."""

    # -- shared by every scheme -------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised quantized value q(x) (the forward without the α̃ factor), a new tensor."""
        return self.quantize_(x.clamp(self.lo, self.hi), x)

    def quantize_scaled_(self, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """q(W/α̃), computed in the fp32 buffer ``x`` (the forward pass)."""
        return self.quantize_(torch.div(w, a, out=x).clamp_(self.lo, self.hi), w)

    def quantize_scaled(self, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """q(W/α̃) as a new fp32 tensor."""
        return self.quantize_scaled_(torch.empty_like(w, dtype=torch.float32), w, a)

    @functools.cached_property
    def integer_grid(self) -> tuple[float, tuple[int, ...]]:
        """(step, k): the levels are step · k with integers k, step as large as possible; every
        ParetoQ grid is one (2 bits: (0.25, (−3, −1, 1, 3)); ternary: (2/3, (−1, 0, 1)))."""
        levels = [Fraction(float(v)).limit_denominator(1000) for v in self.levels().tolist()]
        nonzero = [v for v in levels if v != 0]
        step = Fraction(math.gcd(*(v.numerator for v in nonzero)), math.lcm(*(v.denominator for v in nonzero)))
        return float(step), tuple(int(v / step) for v in levels)

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

    def quantize_(self, c, w):
        return torch.sign(w, out=c)

    def quantize_scaled_(self, x, w, a):
        return torch.sign(w, out=x)

    def coefficient_(self, q, x, mask):
        return q  # sign(W), unmasked

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

    def __post_init__(self):
        # quantize_ does c·k − σ and (r + σ)/k in one op each (r = the rounded integer). That gives
        # the bits of the formula step by step when c·k is exact (k a power of 2) or σ = 0, and when
        # r·(1/k) = r/k for every r the round can give (k a power of 2, or |r| ≤ 1). True for both
        # schemes here; this guards any new one.
        assert math.log2(self.k).is_integer() or (self.sigma == 0 and round(SEQ_CLIP * self.k) <= 1)
        # constants of quantize_ / coefficient_, made once (object.__setattr__: the dataclass is frozen)
        object.__setattr__(self, "_shift", torch.tensor(-self.sigma))
        object.__setattr__(self, "_unshift", torch.tensor(self.sigma / self.k))
        object.__setattr__(self, "_saturates_at_end_levels", float(self.levels()[-1]) == self.saturation)

    def quantize_(self, c, w):
        if torch.compiler.is_compiling():
            # traced into a fused kernel (op count no longer matters): the formula as written, with
            # Python scalars. The 0-d CPU constants below cannot be traced for another device's tensors.
            return c.mul_(self.k).sub_(self.sigma).round_().add_(self.sigma).div_(self.k)
        r = torch.add(self._shift, c, alpha=self.k, out=c).round_()
        return torch.add(self._unshift, r, alpha=1 / self.k, out=r)

    def coefficient_(self, q, x, mask):
        if self._saturates_at_end_levels:  # 2 bits: Q± = ±0.75 are the end levels
            return super().coefficient_(q, x, mask)
        # ternary: Q± = ±1.0, not the end levels ±2/3. (q − x)·M + copysign(1 − M, x)·Q⁺
        return q.sub_(x).mul_(mask).add_(torch.copysign(1 - mask, x).mul_(self.saturation))

    def init_scale(self, w_grouped):
        return w_grouped.abs().amax(dim=-1, keepdim=True)

    def levels(self):
        lo = round(-SEQ_CLIP * self.k - self.sigma)
        hi = round(SEQ_CLIP * self.k - self.sigma)
        return torch.tensor([(i + self.sigma) / self.k for i in range(lo, hi + 1)], dtype=torch.float64).float()


@dataclass(frozen=True, repr=False)
class LSQ(Scheme):
    """LSQ (Esser et al. 2020, as in ParetoQ): q(x) = clamp(round(x), Qn, Qp) = round(clamp(x, Qn, Qp)).

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

    def quantize_(self, c, w):
        return c.round_()  # the clip range ends are integers, so rounding commutes with the clamp

    def init_scale(self, w_grouped):
        # divided by a tensor, not the Python number: on CUDA ``t / 7`` is computed as t·(1/7), which
        # is off by one ulp in some rows, and the largest |W| of such a row then lands just outside
        # the clip range (its straight-through gradient lost) where the reference has it at Qp
        amax = w_grouped.abs().amax(dim=-1, keepdim=True)
        return amax / torch.full_like(amax, self.qp)

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

TABLE_SCHEMES: dict[float, Scheme] = {**SCHEMES, 8: _lsq(8)}
"""Schemes for the embedding table and the LM head (``embed_bits`` / ``head_bits``): those of
``SCHEMES`` and 8 bits, the symmetric integer grid −128…127 (LSQ, reference init max|W|/127) that
GGUF's Q8_0 holds exactly. The decoder's Linear layers (``w_bits``) keep ``SCHEMES``."""


# -- 8-bit activations (``a_bits=8``) ----------------------------------------------------------------
ACT_QMAX = 127  # absmax grid: x̂ = round(x·127/max|x|)·max|x|/127, integers −127…127
ACT_EPS = 1e-5  # floor of max|x| so that an all-zero token stays zero instead of 0/0
GGUF_ACTIVATION_BLOCKS = {"Q8_0": 32, "Q8_K": 256}
"""llama.cpp's CPU matmul rounds the activations to 8 bits before it multiplies them with a quantized
weight: Q1_0, Q2_0, Q4_0 and Q8_0 weights take Q8_0 activations (absmax blocks of 32), the K and TQ
types (Q2_K, Q3_K, TQ1_0, TQ2_0) take Q8_K (blocks of 256) — ggml-cpu's ``vec_dot_type`` of each type."""


class _ActivationFakeQuant(torch.autograd.Function):
    """Absmax 8-bit fake quantization (per token or per block) with a straight-through gradient (∂x̂/∂x = 1)."""

    @staticmethod
    def forward(ctx, x, block):
        return _quantize_activation(x, block)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _quantize_activation(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    xf = x.float()
    if block is not None and block != xf.shape[-1]:
        xf = xf.unflatten(-1, (xf.shape[-1] // block, block))
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(ACT_EPS)
    out = torch.round(xf * ACT_QMAX / amax) * amax / ACT_QMAX
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_activation(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """8-bit absmax fake quantization of a layer input (last dim = features): with m = max|x| over the token
    (``block`` None, as BitNet b1.58) or over each run of ``block`` features (32 or 256: llama.cpp's Q8_0 /
    Q8_K activation blocks), floored at 1e-5, x̂ = round(x·127/m)·m/127, computed in fp32 and returned in x's
    dtype. Gradient: straight through."""
    if block is not None and x.shape[-1] % block:
        raise ValueError(f"activation block {block} does not divide the {x.shape[-1]} input features")
    return _ActivationFakeQuant.apply(x, block)


def gguf_activation_block(w_bits: float, group_size: int | None, in_features: int) -> int:
    """The activation block llama.cpp rounds a layer's input in when paretoq's GGUF export writes it with the
    automatic type choice (``export.gguf.AUTO_ORDER``): 2- and 3-bit layers whose rows and scale groups are
    multiples of 256 become Q2_K / Q3_K (Q8_K activations: 256); every other layer Q1_0, Q2_0 or Q4_0 (Q8_0
    activations: 32). ``tests/export/test_gguf_types.py`` checks this against the export's own choice."""
    k_quant = w_bits in (2, 3) and in_features % 256 == 0 and (group_size is None or group_size % 256 == 0)
    return GGUF_ACTIVATION_BLOCKS["Q8_K" if k_quant else "Q8_0"]


def effective_scale(scale: torch.Tensor) -> torch.Tensor:
    """α̃ = max(α, 1e-5) with ``torch.where`` (not ``clamp``) as the reference: a nan α → 1e-5."""
    return torch.where(scale > SCALE_EPS, scale, SCALE_EPS)


def group_width(group_size: int | None, in_features: int) -> int:
    """Input columns per scale: ``group_size``, or the whole row when it is None (per-row scales)."""
    return in_features if group_size is None else group_size


def group_label(group_size: int | None) -> str:
    """How messages name a scale layout: "per row" or "per group of 64"."""
    return "per row" if group_size is None else f"per group of {group_size}"


def gradient_scale(numel: int, scheme: Scheme) -> float:
    """s_g = 1/√(N·Qp_grad), N the element count of the whole weight matrix."""
    return 1.0 / math.sqrt(numel * scheme.grad_qp)


def _grouped(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (m, n) and α̃ = max(α, 1e-5), as (m, n/g, g) and (m, G, 1) when there are several groups.

    Per-row scales (m, 1) keep the 2-D layout of the reference so its reduction order (and so
    its bits) is reproduced exactly.
    """
    m, n = weight.shape
    scale = effective_scale(scale)
    groups = scale.shape[-1]
    if groups == 1:
        return weight, scale
    return weight.reshape(m, groups, n // groups), scale.unsqueeze(-1)


BLOCK_ELEMENTS = 1 << 17
"""On CPU, rows are processed in blocks of about this many elements, in a few scratch buffers made
once per call: they stay in the L2 cache across the ~12 elementwise passes instead of streaming
whole matrices through memory at each pass, and need no fresh (page-faulting) memory per pass.
Per-row results do not depend on the blocking (``tests/quant/test_cache.py``; and
``benchmarks/quantizer_micro.py`` compares 4096×1024 weights with the reference bit for bit)."""


def _row_blocks(w: torch.Tensor, buffers: int):
    """Yield (rows, scratch): a slice of rows of ``w`` and ``buffers`` fp32 tensors shaped like
    ``w[rows]``, the same memory block after block. Accelerators get one block (one launch per op)."""
    rows = w.shape[0] if w.device.type != "cpu" else max(1, BLOCK_ELEMENTS // (w.numel() // w.shape[0]))
    scratch = torch.empty((buffers, min(rows, w.shape[0]), *w.shape[1:]), dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], rows):
        n = min(rows, w.shape[0] - i)
        yield slice(i, i + n), scratch[:, :n].unbind(0)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None,
                    kernels=None):
    """Ŵ = α̃·q(W/α̃) as a new tensor of ``dtype`` (default: the weight's), no autograd.

    The fp32 product is rounded once to ``dtype``: the same bits as ``Ŵ.to(dtype)``, one pass fewer.
    ``kernels``: None for the eager math below, or a ``paretoq.quant.fused.FusedKernels`` (the same
    bits in one fused pass).
    """
    return _quantize_weight(weight, scale, scheme, dtype, kernels)


def _quantize_weight(weight, scale, scheme, dtype, kernels=None):
    """``quantize_weight`` for callers that already run without autograd (entering ``no_grad`` has
    a cost, paid per layer and step)."""
    if kernels is not None:
        return kernels.forward(weight, scale, scheme, dtype or weight.dtype)
    w, a = _grouped(weight, scale)
    out = torch.empty(w.shape, dtype=dtype or weight.dtype, device=weight.device)
    for rows, (x,) in _row_blocks(w, 1):
        torch.mul(scheme.quantize_scaled_(x, w[rows], a[rows]), a[rows], out=out[rows])
    return out.reshape(weight.shape)


@torch.no_grad()
def quantize_backward(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, grad: torch.Tensor, *,
                      weight_grad: bool = True, scale_grad: bool = True, inplace: bool = False, kernels=None):
    """(∂L/∂W, ∂L/∂α) from g = ∂L/∂Ŵ (fp32, or bf16 under autocast: read as fp32, values unchanged).

    ``inplace=True`` writes ∂L/∂W into ``grad`` (an fp32 buffer the caller owns). Either gradient
    is None when not asked for. Per block of rows: x = W/α̃, c = clamp(x), M = [c == x], q from c
    in place, the coefficient in place, ·g, ·s_g, row sum, M·g — each value rounded as the
    reference rounds it. Every operand is fp32: mixed-dtype and bool operands take slow paths on CPU.
    ``kernels``: None for that eager math, or a ``paretoq.quant.fused.FusedKernels`` (one fused pass;
    ∂L/∂W the same bits, ∂L/∂α the same products summed in another order; ``inplace`` unused).
    """
    return _quantize_backward(weight, scale, scheme, grad, weight_grad, scale_grad, inplace, kernels)


def _quantize_backward(weight, scale, scheme, grad, weight_grad=True, scale_grad=True, inplace=False, kernels=None):
    """``quantize_backward`` for callers that already run without autograd."""
    if kernels is not None:
        return kernels.backward(weight, scale, scheme, grad, weight_grad, scale_grad)
    w, a = _grouped(weight, scale)
    g = grad.reshape(w.shape)
    s_g = gradient_scale(weight.numel(), scheme)
    inplace = inplace and g.dtype == w.dtype
    grad_weight = (g if inplace else torch.empty_like(w)) if weight_grad else None
    grad_scale = torch.empty(a.shape, dtype=a.dtype, device=a.device) if scale_grad else None
    for rows, (x, c, mask, g32) in _row_blocks(w, 4):
        wb, ab = w[rows], a[rows]
        gb = g[rows] if g.dtype == w.dtype else g32.copy_(g[rows])
        torch.div(wb, ab, out=x)
        torch.clamp(x, scheme.lo, scheme.hi, out=c)
        torch.eq(c, x, out=mask)  # M: 1.0 inside [lo, hi], 0.0 outside (and for nan)
        if scale_grad:
            coef = scheme.coefficient_(scheme.quantize_(c, wb), x, mask)
            torch.sum(coef.mul_(gb).mul_(s_g), dim=-1, keepdim=True, out=grad_scale[rows])
        if weight_grad:
            torch.mul(gb, mask, out=grad_weight[rows])
    return (None if grad_weight is None else grad_weight.reshape(weight.shape),
            None if grad_scale is None else grad_scale.reshape(scale.shape))


class FakeQuantize(torch.autograd.Function):
    """Ŵ = α̃·q(W/α̃) with the straight-through / LSQ gradients of the module docstring.

    Saves only W and α (parameters: no extra memory) and recomputes x = W/α̃ in backward.
    ``dtype`` is the dtype of Ŵ (e.g. bf16 under autocast); gradients come back in fp32.
    ``kernels`` (None: eager) runs both passes, as in ``quantize_weight``.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None,
                kernels=None):
        ctx.scheme, ctx.kernels = scheme, kernels
        ctx.save_for_backward(weight, scale)
        return _quantize_weight(weight, scale, scheme, dtype, kernels)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: no graph through the quantizer
            grad_weight, grad_scale = quantize_backward(weight, scale, ctx.scheme, grad_output, weight_grad=needs[0],
                                                        scale_grad=needs[1], kernels=ctx.kernels)
        else:
            grad_weight, grad_scale = _quantize_backward(weight, scale, ctx.scheme, grad_output, needs[0], needs[1],
                                                         False, ctx.kernels)
        return grad_weight, grad_scale, None, None, None


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None,
                  kernels=None):
    """Differentiable fake quantization of ``weight`` (m, n) with scales (m, G), G | n; Ŵ in ``dtype``.

    ``kernels``: None for the eager math of this module, or a ``paretoq.quant.fused.FusedKernels``
    (the same Ŵ and ∂L/∂W bits, ∂L/∂α to summation order, one fused pass each way)."""
    return FakeQuantize.apply(weight, scale, scheme, dtype, kernels)


@torch.no_grad()
def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Integer codes (uint8, shape of ``weight``) of the fake-quantized weight."""
    w, a = _grouped(weight.float(), scale.float())
    a = a.clamp_min(SCALE_EPS)
    # the forward's own path (binary takes sign(W), not sign(W/α̃), which underflows for denormal W)
    return scheme.to_codes(scheme.quantize_scaled(w, a)).reshape(weight.shape)


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
    g = group_width(group_size, n)
    return scheme.init_scale(weight.detach().float().reshape(m, n // g, g)).reshape(m, n // g)
