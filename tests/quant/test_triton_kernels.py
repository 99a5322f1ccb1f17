"""The Triton quantizer kernels (``paretoq.quant.triton_kernels``, the GPU default) against the eager
quantizer, bit for bit, on CPU in Triton's interpreter.

How: Triton runs a kernel in its interpreter (numpy, on CPU tensors) when ``TRITON_INTERPRET=1`` is
set before ``triton.jit`` decorates it, i.e. before ``paretoq.quant.triton_kernels`` is imported.
This process must keep the real kernels (a GPU run of the suite tests them in ``tests/test_cuda.py``),
so the kernels run in one child process with that variable set (``interpreted`` below, once per
module): it reads the cases' inputs from a file, runs the kernels and writes their outputs; the
comparisons with ``functional.py`` are made here. The interpreter computes in numpy's fp32, which
rounds every operation as IEEE says; that is what the kernels are written to need (correctly
rounded division, round half to even from exact operations, bf16 rounding by hand), so the same
kernels give the same bits on a GPU (``enable_fp_fusion=False``: no FMA contraction there). That
last step is checked too, without a GPU: the kernels compiled for an H100 (Triton's own ptxas) hold
only round-to-nearest fp32 add/sub/mul/div (``test_gpu_code_rounds_every_operation_as_written``).

What holds: Ŵ and ∂L/∂W bit for bit (their raw bits, so ±0 counts), ∂L/∂α to summation order, for
every scheme, per row and per group, fp32 and bf16 weights, fp32/bf16/fp16 Ŵ and g, shapes that
are no multiple of the blocks and rows longer than a block; weights placed on levels, rounding
ties and clip bounds; zeros, nans and scales below 1e-5. The controls: the same kernels dividing
as x = W·(1/α̃) (one ulp off for some values, as an approximate division is) or rounding ties away
from zero differ from eager on those boundary weights, so the bit comparison sees a one-ulp change.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from paretoq.quant import QuantConfig, QuantLinear
from paretoq.quant.functional import SCHEMES, init_scale, quantize_backward, quantize_weight
from paretoq.quant.fused import FusedKernels

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BITS = sorted(SCHEMES)

CHILD = r"""
import json, os, sys
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from paretoq.quant import triton_kernels
from paretoq.quant.functional import SCHEMES, fake_quantize
from paretoq.quant.fused import FusedKernels

cases = torch.load(sys.argv[1])
out = {}
for name, c in cases.items():
    scheme, opts = SCHEMES[c["bits"]], c.get("options", {})
    if c.get("autograd"):  # through FusedKernels(triton=True) and autograd, as a QuantLinear runs it
        kernels = FusedKernels(triton=True)
        w, a = c["w"].clone().requires_grad_(), c["a"].clone().requires_grad_()
        w_hat = fake_quantize(w, a, scheme, c["dtype"], kernels)
        w_hat.backward(c["g"])
        out[name] = {"w_hat": w_hat.detach(), "gw": w.grad, "ga": a.grad, "calls": kernels.calls}
        continue
    w_hat = triton_kernels.forward(c["w"], c["a"], scheme, c["dtype"], **opts)
    gw, ga = triton_kernels.backward(c["w"], c["a"], scheme, c["g"], **opts)
    out[name] = {"w_hat": w_hat, "gw": gw, "ga": ga}
torch.save(out, sys.argv[2])
"""


def _inputs(shape, bits, group, seed, w_dtype=F32, g_dtype=F32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * 0.05
    groups = 1 if group is None else shape[1] // group
    a = init_scale(w, SCHEMES[bits], group) * (0.5 + torch.rand(shape[0], groups, generator=gen))
    return w.to(w_dtype), a, torch.randn(*shape, generator=gen).to(g_dtype)


def _boundary_inputs(bits, seed=5):
    """Weights whose x = W/α̃ is (to an ulp) a level, a midpoint between two levels (a rounding tie)
    or a clip bound, a third of them moved by one ulp either way: where an ulp of x changes Ŵ or the
    straight-through mask."""
    scheme = SCHEMES[bits]
    lv = scheme.levels()
    edges = torch.cat([lv, (lv[1:] + lv[:-1]) / 2, torch.tensor([scheme.lo, scheme.hi])])
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(64, 1, generator=gen) * 0.01 + 1e-3
    w = edges[torch.randint(len(edges), (64, 200), generator=gen)] * a
    nudge = torch.randint(3, w.shape, generator=gen)
    w = torch.where(nudge == 0, w, torch.nextafter(w, torch.where(nudge == 1, float("inf"), -float("inf"))))
    return w, a, torch.randn(64, 200, generator=gen)


def _special_inputs(bits):
    """Zeros of both signs, nans, infinities and weights far outside the clip range; scales of 0,
    below 1e-5, negative and nan (all become 1e-5)."""
    w, a, g = _inputs((6, 40), bits, None, 9)
    w[0, :6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e3])
    w[1, :3] = torch.tensor([-0.0, 1e-9, -1e-9])
    a[2:6, 0] = torch.tensor([0.0, 1e-7, -1.0, float("nan")])
    return w, a, g


def _cases() -> dict:
    cases = {}
    for bits in BITS:
        for group in (None, 16):
            for w_dtype in (F32, BF16):
                for dtype in (F32, BF16):
                    w, a, g = _inputs((37, 96), bits, group, int(bits * 100) + (group or 0), w_dtype, dtype)
                    cases[f"{bits}-{group}-{w_dtype}-{dtype}"] = dict(bits=bits, w=w, a=a, g=g, dtype=dtype)
        # rows longer than a block (the backward loops over 3 column blocks, the last partial); groups of 20
        for group in (None, 20):
            w, a, g = _inputs((5, 2500), bits, group, 7 + int(bits * 10))
            cases[f"{bits}-long-{group}"] = dict(bits=bits, w=w, a=a, g=g, dtype=BF16)
        w, a, g = _inputs((9, 33), bits, None, 8, F32, F16)
        cases[f"{bits}-fp16"] = dict(bits=bits, w=w, a=a, g=g, dtype=F16)
        w, a, g = _boundary_inputs(bits)
        cases[f"{bits}-boundary"] = dict(bits=bits, w=w, a=a, g=g, dtype=F32)
        for variant in ({"division": "reciprocal"}, {"rounding": "half_away"}):
            cases[f"{bits}-boundary-{next(iter(variant.values()))}"] = dict(bits=bits, w=w, a=a, g=g, dtype=F32,
                                                                              options=variant)
        w, a, g = _special_inputs(bits)
        cases[f"{bits}-special"] = dict(bits=bits, w=w, a=a, g=g, dtype=BF16)
        w, a, g = _inputs((24, 48), bits, 16, 11, F32, BF16)
        cases[f"{bits}-autograd"] = dict(bits=bits, w=w, a=a, g=g, dtype=BF16, autograd=True)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(cases, the kernels' outputs on them in Triton's interpreter, in a child process)."""
    tmp = tmp_path_factory.mktemp("triton")
    cases = _cases()
    torch.save(cases, tmp / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "cases.pt"), str(tmp / "out.pt")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, torch.load(tmp / "out.pt")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (±0 told apart)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _eager(case):
    """functional.py's eager quantizer on the case. A bf16 weight is read as fp32 (exactly: what the
    eager math does with it, ``torch.div`` into fp32) and ∂L/∂W rounded once to its dtype."""
    scheme, w = SCHEMES[case["bits"]], case["w"]
    w_hat = quantize_weight(w.float(), case["a"], scheme, case["dtype"])
    gw, ga = quantize_backward(w.float(), case["a"], scheme, case["g"])
    return w_hat, gw.to(w.dtype), ga


def _assert_exact(got, expected):
    w_hat, gw, ga = expected
    assert got["w_hat"].dtype == w_hat.dtype and got["gw"].dtype == gw.dtype and got["ga"].dtype == F32
    assert torch.equal(_bits(got["w_hat"]), _bits(w_hat)), "Ŵ"
    assert torch.equal(_bits(got["gw"]), _bits(gw)), "∂L/∂W"
    torch.testing.assert_close(got["ga"], ga, rtol=2e-6, atol=2e-6 * float(ga.abs().max()))


@pytest.mark.parametrize("bits", BITS)
def test_triton_kernels_match_eager_bit_for_bit(bits, interpreted):
    cases, out = interpreted
    names = [n for n in cases if n.startswith(f"{bits}-") and n.split("-")[1] in ("None", "16", "long", "fp16")]
    assert len(names) == 2 * 2 * 2 + 2 + 1
    for name in names:
        _assert_exact(out[name], _eager(cases[name]))


@pytest.mark.parametrize("bits", [b for b in BITS if b != 1])
def test_bf16_weights_read_as_the_eager_quantizer_reads_them(bits):
    """The reference ``_eager`` takes for a bf16 weight is the eager quantizer's own result on it (where
    the eager math takes bf16 weights: not binary, whose ``torch.sign(out=fp32)`` refuses them)."""
    w, a, g = _inputs((37, 96), bits, 16, 3, BF16, BF16)
    case = dict(bits=bits, w=w, a=a, g=g, dtype=BF16)
    expected = _eager(case)
    assert torch.equal(_bits(quantize_weight(w, a, SCHEMES[bits], BF16)), _bits(expected[0]))
    gw, ga = quantize_backward(w, a, SCHEMES[bits], g)
    assert gw.dtype == BF16 and torch.equal(_bits(gw), _bits(expected[1]))
    torch.testing.assert_close(ga, expected[2], rtol=2e-6, atol=2e-6 * float(expected[2].abs().max()))


@pytest.mark.parametrize("bits", BITS)
def test_boundary_weights_and_their_controls(bits, interpreted):
    """On weights at levels, ties and clip bounds the kernels give the eager bits; the same kernels
    dividing by multiplying with 1/α̃ (an ulp off for some x) do not, nor do they rounding ties away
    from zero (binary does not round: only the division control applies)."""
    cases, out = interpreted
    expected = _eager(cases[f"{bits}-boundary"])
    _assert_exact(out[f"{bits}-boundary"], expected)
    for variant in ("reciprocal", "half_away"):
        got = out[f"{bits}-boundary-{variant}"]
        differs = int((_bits(got["w_hat"]) != _bits(expected[0])).sum() + (_bits(got["gw"]) != _bits(expected[1])).sum())
        if bits == 1 and variant == "half_away":
            assert differs == 0
        else:
            assert differs > 0, f"the {variant} control went unnoticed"


@pytest.mark.parametrize("bits", BITS)
def test_special_values(bits, interpreted):
    """Zeros, nans, infinities, scales at or below 1e-5: nan where eager has nan, the other values bit
    for bit (a nan's own bits are not compared: PyTorch's CPU and GPU conversions differ there)."""
    cases, out = interpreted
    case, got = cases[f"{bits}-special"], out[f"{bits}-special"]
    expected = _eager(case)
    for name, mine, theirs in (("Ŵ", got["w_hat"], expected[0]), ("∂L/∂W", got["gw"], expected[1])):
        assert torch.equal(mine.isnan(), theirs.isnan()), name
        finite = ~theirs.isnan()
        assert torch.equal(_bits(mine[finite]), _bits(theirs[finite])), name
    assert torch.equal(got["ga"].isnan(), expected[2].isnan())
    assert bool(expected[2].isnan().any()) is (bits != 1)  # the row with nan and ±inf (binary: sign(nan) = 0)
    ok = ~expected[2].isnan()
    torch.testing.assert_close(got["ga"][ok], expected[2][ok], rtol=2e-6, atol=2e-6 * float(expected[2][ok].abs().max()))


@pytest.mark.parametrize("bits", BITS)
def test_fused_kernels_take_the_triton_path(bits, interpreted):
    """``FusedKernels(triton=True)`` under autograd (``fake_quantize``): both passes go to the Triton
    kernels (counted), with the eager quantizer's results."""
    cases, out = interpreted
    case, got = cases[f"{bits}-autograd"], out[f"{bits}-autograd"]
    assert got["calls"] == {"prebuilt": 0, "compiled": 0, "eager": 0, "triton": 2}
    _assert_exact(got, _eager(case))


def test_a_triton_failure_is_one_warning_and_the_eager_math(caplog):
    """Here (no interpreter, no GPU) the Triton kernels cannot run CPU tensors: one warning, then the
    eager math for every call, with its numbers."""
    kernels = FusedKernels(triton=True)
    layer = QuantLinear(48, 24, config=QuantConfig(w_bits=2))
    layer.kernels = kernels
    x = torch.randn(3, 48)
    with caplog.at_level(logging.WARNING, logger="paretoq.quant.fused"):
        y = layer(x)
        y.square().sum().backward()
    assert kernels.failed and kernels.calls["triton"] == 0 and kernels.calls["eager"] >= 2
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(
        "fused quantizer kernels unavailable (")
    ref = QuantLinear(48, 24, config=QuantConfig(w_bits=2))
    ref.load_state_dict(layer.state_dict())
    assert torch.equal(ref(x), y.detach())


def test_calls_the_kernels_do_not_take_stay_off_triton():
    """fp16 weights, a non-contiguous weight and a scheme subclass (which may change the math) are
    not the Triton kernels' (``supports``; checked without running a kernel)."""
    from dataclasses import dataclass

    from paretoq.quant import triton_kernels
    from paretoq.quant.functional import LSQ

    @dataclass(frozen=True, repr=False)
    class Other(LSQ):
        pass

    w, a, g = _inputs((8, 32), 4, None, 1)
    assert triton_kernels.supports(w, a, SCHEMES[4], g, BF16)
    assert not triton_kernels.supports(w.half(), a, SCHEMES[4])
    assert not triton_kernels.supports(w.t().contiguous().t(), a, SCHEMES[4])
    assert not triton_kernels.supports(w, a.double(), SCHEMES[4])
    assert not triton_kernels.supports(w, a, Other(**{f: getattr(SCHEMES[4], f) for f in
                                                      ("bits", "qn", "qp", "grad_qp", "lo", "hi", "n_levels",
                                                       "code_bits")}))
    kernels = FusedKernels(triton=True)  # fp16 weight: the eager math, never Triton
    assert torch.equal(quantize_weight(w.half(), a, SCHEMES[4], F16, kernels=kernels),
                       quantize_weight(w.half(), a, SCHEMES[4], F16))
    assert kernels.calls["triton"] == 0 and not kernels.failed


def test_triton_is_imported_only_when_a_call_goes_there():
    """Triton is an optional dependency and its import takes time: ``paretoq.quant`` does not import
    it, and a fused call on CPU tensors does not import the Triton kernels (a one-row weight: the
    eager math, nothing to build)."""
    code = ("import sys, torch, paretoq.quant\n"
            "from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale\n"
            "from paretoq.quant.fused import FusedKernels\n"
            "print('triton' in sys.modules)\n"
            "w = torch.randn(1, 16, requires_grad=True)\n"
            "a = init_scale(w.detach(), SCHEMES[2], None).requires_grad_()\n"
            "kernels = FusedKernels()\n"
            "fake_quantize(w, a, SCHEMES[2], torch.float32, kernels).sum().backward()\n"
            "print('paretoq.quant.triton_kernels' in sys.modules, kernels.calls['eager'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "2"]


def _ptx(kernel: str, bits, fusion: bool = False, division: str = "rn") -> str:
    """The PTX Triton makes of a kernel for an H100 (sm_90), compiled here without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from paretoq.quant import triton_kernels

    fn = getattr(triton_kernels, f"_{kernel}_kernel")
    consts = {**triton_kernels._constants(SCHEMES[bits]), "DIV": triton_kernels.DIVISION[division], "HALF_AWAY": 0,
              "BLOCK_R": 2, "BLOCK_C": 1024}
    if kernel == "forward":
        del consts["SAT"], consts["TERNARY"]
        consts["OUT_BF16"] = True
        types = {"w_ptr": "*fp32", "a_ptr": "*fp32", "out_ptr": "*i16", "rows": "i32", "cols": "i32"}
    else:
        consts.update(WEIGHT_GRAD=True, SCALE_GRAD=True, GW_BF16=False)
        types = {"w_ptr": "*fp32", "a_ptr": "*fp32", "g_ptr": "*bf16", "gw_ptr": "*fp32", "ga_ptr": "*fp32",
                 "rows": "i32", "cols": "i32", "s_g": "fp32"}
    signature = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    constexprs = {(i,): consts[n] for i, n in enumerate(fn.arg_names) if n in consts}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": fusion})
    return compiled.asm["ptx"]


def _fp32_ops(ptx: str) -> set[str]:
    return {op for op in re.findall(r"^\s*(?:@%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*)\s", ptx, re.M) if "f32" in op}


@pytest.mark.parametrize("bits", [1.58, 2, 4])
def test_gpu_code_rounds_every_operation_as_written(bits):
    """What the interpreter cannot see: the code a GPU runs. Compiled for an H100 here (Triton's own
    ptxas, no GPU), the kernels' fp32 arithmetic is IEEE round-to-nearest, one rounding per operation
    as in PyTorch: add/sub/mul/div all ``.rn``, no fused multiply–add, no approximate division or
    reciprocal. Controls: the reciprocal variant compiles to an approximate reciprocal or division,
    and with FMA contraction allowed (Triton's default) the multiply–adds fuse."""
    for kernel in ("forward", "backward"):
        ops = _fp32_ops(_ptx(kernel, bits))
        arithmetic = {op for op in ops if op.split(".")[0] in ("add", "sub", "mul", "div", "fma", "rcp", "sqrt")}
        assert "div.rn.f32" in arithmetic and arithmetic <= {"add.rn.f32", "sub.rn.f32", "mul.rn.f32", "div.rn.f32"}, (
            kernel, sorted(arithmetic))
    reciprocal = _fp32_ops(_ptx("forward", bits, division="reciprocal"))
    assert any(op.startswith(("rcp.approx", "div.full", "div.approx")) for op in reciprocal), sorted(reciprocal)
    assert any(op.startswith("fma") for op in _fp32_ops(_ptx("backward", bits, fusion=True)))
