"""The quantizer as hand-written Triton kernels: ``functional.py``'s operations, one pass each way.

What ``paretoq.quant.fused.FusedKernels`` runs for CUDA tensors (the "triton" path). Forward reads W
and α and writes Ŵ = α̃·q(W/α̃) in the compute dtype; backward reads W, α and g = ∂L/∂Ŵ and writes
∂L/∂W = M ⊙ g and ∂L/∂α = Σ_row (coef ⊙ g)·s_g. The formulas are ``functional.py``'s (its docstring
has the math); here every one of its IEEE fp32 operations is written out in the same order, so
that Ŵ and ∂L/∂W come out bit for bit as the eager quantizer's, and ∂L/∂α sums the same fp32
products in another order:

- x = W / α̃ with ``tl.math.div_rn``, the correctly rounded division PyTorch computes (Triton's
  ``/`` on fp32 is an approximate division on NVIDIA GPUs, off by an ulp for some values: then a
  weight next to a rounding tie or a clip boundary gets another level or loses its gradient);
- round half to even from ``tl.floor`` on |y| with exact operations (y − ⌊y⌋ is exact for |y| <
  2²³, and every rounded value here is clamped first), the sign copied back (−0.3 → −0, as
  ``torch.round``): no rounding-mode intrinsic, so the same code runs in Triton's interpreter;
- clamp as two selects (``torch.clamp`` keeps a nan, Triton's ``minimum`` may not); sign(W) as
  [W > 0] − [W < 0] (``torch.sign``: 0 for ±0 and nan); the ternary coefficient's copysign from
  the sign bit;
- kernels are launched with ``enable_fp_fusion=False``: no multiply–add is contracted into an FMA
  (which rounds once where PyTorch rounds twice), so each product rounds as written;
- bf16 or fp16 values (Ŵ out, g in, a bf16 weight in or its gradient out) are converted as
  PyTorch converts them: exactly up to fp32, round to nearest even down (to bf16 with integer
  operations on the bits, ``_bf16_bits``: Triton's interpreter truncates).

Layout: W (m, n) viewed as rows of one scale each (m·G rows of n/G columns: per-row and grouped
scales alike); contiguous tensors only (``supports``). The forward tiles (rows × columns); the
backward gives each program a block of rows and loops over their columns, summing ∂L/∂α in
registers (one launch, deterministic).

Tested bit for bit against ``functional.py`` in Triton's interpreter on CPU
(``tests/quant/test_triton_kernels.py``), which also compiles the kernels for an H100 without a GPU
and checks that the PTX holds only round-to-nearest fp32 ``add``/``sub``/``mul``/``div`` (no FMA,
no approximate division; ``floor`` flushes denormals, which round to 0 anyway), and on a GPU
(``tests/test_cuda.py``, marker ``gpu``).
Importing this module imports Triton (an optional dependency: ``pip install paretoq[triton]``);
``fused.py`` imports it only when a CUDA tensor comes.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

from paretoq.quant import functional

BINARY, SEQ, LSQ = 0, 1, 2
_KINDS = {functional.Binary: BINARY, functional.StretchedElastic: SEQ, functional.LSQ: LSQ}
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # W (fp32 master weights, or bf16 ones); α is fp32
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # Ŵ, and g = ∂L/∂Ŵ
TILE = 2048  # elements a program handles per step (rows × columns)
MAX_COLUMNS = 1024  # widest column block; longer rows loop (backward) or take several programs (forward)

# Variants for the tests' controls only (``division=``): the kernels with x = W·(1/α̃) instead of
# W / α̃ (one ulp off for some values), or rounding half away from zero instead of half to even.
DIVISION = {"rn": 0, "reciprocal": 1}
ROUNDING = {"half_even": 0, "half_away": 1}


@triton.jit
def _round_half_even(y, HALF_AWAY: tl.constexpr):
    """torch.round(y) for |y| < 2²³ (sign of zero and nan included), from exact operations."""
    ay = tl.abs(y)
    f = tl.floor(ay)
    d = ay - f  # exact: f ≤ ay < f + 1 and ay's last bit is no finer than d's
    if HALF_AWAY:  # a control: ties away from zero
        up = d >= 0.5
    else:
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        up = (d > 0.5) | ((d == 0.5) & odd)
    r = tl.where(up, f + 1.0, f)
    negative = y.to(tl.int32, bitcast=True) < 0  # the sign bit (−0.0 included)
    return tl.where(negative, -r, r)


@triton.jit
def _bf16_bits(v):
    """fp32 → bf16 rounded to nearest even, as its 16 bits (int16); a nan → 0x7FC0 (PyTorch's scalar
    conversion). Written out with integer operations: Triton's interpreter truncates instead."""
    u = v.to(tl.uint32, bitcast=True)
    rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
    return tl.where(v != v, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _store(ptr, offs, v, ok, BF16: tl.constexpr):
    """Store fp32 ``v`` into ``ptr``'s dtype (bf16: into an int16 view of it, rounded by ``_bf16_bits``)."""
    if BF16:
        tl.store(ptr + offs, _bf16_bits(v), mask=ok)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scaled(w, a, DIV: tl.constexpr):
    """x = W / α̃, correctly rounded (or the reciprocal control)."""
    if DIV == 1:
        return w * (1.0 / a)
    return tl.math.div_rn(w, a)


@triton.jit
def _clamp(x, LO: tl.constexpr, HI: tl.constexpr):
    """torch.clamp(x, LO, HI): a nan stays nan."""
    return tl.where(x < LO, LO, tl.where(x > HI, HI, x))


@triton.jit
def _sign(w):
    """torch.sign(w) as fp32: [w > 0] − [w < 0] (0 for ±0 and nan)."""
    return (w > 0).to(tl.float32) - (w < 0).to(tl.float32)


@triton.jit
def _quantize(c, w, KIND: tl.constexpr, K: tl.constexpr, SIGMA: tl.constexpr, HALF_AWAY: tl.constexpr):
    """q from c = clamp(x, lo, hi), as ``Scheme.quantize_`` (binary: sign(W))."""
    if KIND == 0:
        return _sign(w)
    elif KIND == 1:  # SEQ: (round(c·k − σ) + σ) / k
        r = _round_half_even(c * K - SIGMA, HALF_AWAY)
        return tl.math.div_rn(r + SIGMA, tl.full(r.shape, K, tl.float32))
    else:  # LSQ: round(clamp(x, Qn, Qp))
        return _round_half_even(c, HALF_AWAY)


@triton.jit(do_not_specialize=["rows"])  # one compilation for every row count (cols: aligned loads)
def _forward_kernel(w_ptr, a_ptr, out_ptr, rows, cols,
                    KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, K: tl.constexpr, SIGMA: tl.constexpr,
                    EPS: tl.constexpr, DIV: tl.constexpr, HALF_AWAY: tl.constexpr, OUT_BF16: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = r < rows
    ok = row_ok[:, None] & (c < cols)[None, :]
    offs = r[:, None] * cols + c[None, :]
    a = tl.load(a_ptr + r, mask=row_ok, other=1.0)
    a = tl.where(a > EPS, a, EPS)[:, None]  # α̃ = max(α, 1e-5) as torch.where: a nan α → 1e-5
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if KIND == 0:
        q = _sign(w)
    else:
        q = _quantize(_clamp(_scaled(w, a, DIV), LO, HI), w, KIND, K, SIGMA, HALF_AWAY)
    _store(out_ptr, offs, q * a, ok, OUT_BF16)


@triton.jit(do_not_specialize=["rows"])
def _backward_kernel(w_ptr, a_ptr, g_ptr, gw_ptr, ga_ptr, rows, cols, s_g,
                     KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, K: tl.constexpr, SIGMA: tl.constexpr,
                     SAT: tl.constexpr, TERNARY: tl.constexpr, EPS: tl.constexpr, DIV: tl.constexpr,
                     HALF_AWAY: tl.constexpr, WEIGHT_GRAD: tl.constexpr, SCALE_GRAD: tl.constexpr, GW_BF16: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    a = tl.load(a_ptr + r, mask=row_ok, other=1.0)
    a = tl.where(a > EPS, a, EPS)[:, None]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (c < cols)[None, :]
        offs = r[:, None] * cols + c[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = _scaled(w, a, DIV)
        cl = _clamp(x, LO, HI)
        mask = (cl == x).to(tl.float32)  # M: 1 inside [lo, hi], 0 outside and for nan
        if SCALE_GRAD:
            q = _quantize(cl, w, KIND, K, SIGMA, HALF_AWAY)
            if KIND == 0:
                coef = q  # sign(W), unmasked
            elif TERNARY:  # (q − x)·M + copysign(1 − M, x)·Q⁺
                keep = 1.0 - mask
                coef = (q - x) * mask + tl.where(x.to(tl.int32, bitcast=True) < 0, -keep, keep) * SAT
            else:  # q − x·M (the saturation values are the end levels)
                coef = q - x * mask
            acc += tl.where(ok, (coef * g) * s_g, 0.0)
        if WEIGHT_GRAD:
            _store(gw_ptr, offs, g * mask, ok, GW_BF16)
    if SCALE_GRAD:
        tl.store(ga_ptr + r, tl.sum(acc, axis=1), mask=row_ok)


# -- host side -------------------------------------------------------------------------------------
def supports(weight: torch.Tensor, scale: torch.Tensor, scheme, grad: torch.Tensor | None = None,
             dtype: torch.dtype | None = None) -> bool:
    """Whether these kernels take the call: a scheme of ``functional``'s three kinds (not a subclass,
    which may change the math), W fp32 or bf16 and α fp32, contiguous, on one device, non-empty;
    Ŵ (``dtype``) and g fp32, bf16 or fp16."""
    return (type(scheme) in _KINDS and weight.dim() == 2 and weight.numel() > 0
            and weight.dtype in WEIGHT_DTYPES and scale.dtype == torch.float32
            and weight.is_contiguous() and scale.is_contiguous() and scale.device == weight.device
            and weight.shape[0] == scale.shape[0] and scale.dim() == 2 and weight.shape[1] % scale.shape[1] == 0
            and (dtype is None or dtype in OUT_DTYPES)
            and (grad is None or (grad.dtype in OUT_DTYPES and grad.device == weight.device
                                  and grad.numel() == weight.numel())))


def _constants(scheme) -> dict:
    kind = _KINDS[type(scheme)]
    k = float(getattr(scheme, "k", 1.0))
    sigma = float(getattr(scheme, "sigma", 0.0))
    ternary = kind == SEQ and not scheme._saturates_at_end_levels
    sat = float(scheme.saturation) if kind == SEQ else 0.0
    return dict(KIND=kind, LO=float(scheme.lo), HI=float(scheme.hi), K=k, SIGMA=sigma, SAT=sat, TERNARY=ternary,
                EPS=functional.SCALE_EPS)


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(cols), MAX_COLUMNS)
    block_r = max(1, min(triton.next_power_of_2(rows), TILE // block_c))
    return block_r, block_c


def _launch_options(division: str, rounding: str) -> dict:
    return dict(DIV=DIVISION[division], HALF_AWAY=ROUNDING[rounding], num_warps=4, enable_fp_fusion=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bf16 output as int16 (the kernels write its bits), any other as it is."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _rows(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of the one-scale-per-row view."""
    groups = scale.shape[1]
    return weight.shape[0] * groups, weight.shape[1] // groups


def forward(weight: torch.Tensor, scale: torch.Tensor, scheme, dtype: torch.dtype, *, division: str = "rn",
            rounding: str = "half_even") -> torch.Tensor:
    """Ŵ in ``dtype``, the bits of ``functional.quantize_weight(weight, scale, scheme, dtype)``."""
    rows, cols = _rows(weight, scale)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    block_r, block_c = _blocks(rows, cols)
    consts = _constants(scheme)
    del consts["SAT"], consts["TERNARY"]
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _forward_kernel[grid](weight, scale, _bits(out), rows, cols, **consts, OUT_BF16=dtype == torch.bfloat16,
                          BLOCK_R=block_r, BLOCK_C=block_c, **_launch_options(division, rounding))
    return out


def backward(weight: torch.Tensor, scale: torch.Tensor, scheme, grad: torch.Tensor, weight_grad: bool = True,
             scale_grad: bool = True, *, division: str = "rn", rounding: str = "half_even"):
    """(∂L/∂W in W's dtype, ∂L/∂α fp32), as ``functional.quantize_backward``; None where not asked for."""
    rows, cols = _rows(weight, scale)
    grad = grad.contiguous()
    gw = torch.empty_like(weight) if weight_grad else None
    ga = torch.empty(scale.shape, dtype=torch.float32, device=weight.device) if scale_grad else None
    if not (weight_grad or scale_grad):
        return gw, ga
    block_r, block_c = _blocks(rows, cols)
    s_g = functional.gradient_scale(weight.numel(), scheme)
    grid = (triton.cdiv(rows, block_r),)
    _backward_kernel[grid](weight, scale, grad, weight if gw is None else _bits(gw), scale if ga is None else ga, rows,
                           cols, s_g, **_constants(scheme), WEIGHT_GRAD=weight_grad, SCALE_GRAD=scale_grad,
                           GW_BF16=weight_grad and weight.dtype == torch.bfloat16,
                           BLOCK_R=block_r, BLOCK_C=block_c, **_launch_options(division, rounding))
    return gw, ga
