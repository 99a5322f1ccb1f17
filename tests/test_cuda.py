"""The quantizer, MiniCPM and `paretoq train` on a CUDA GPU: the numbers the CPU suite pins, again.

Marked ``gpu``: skipped where no CUDA device is (this project's CI has none); run them where one
is, e.g. ``pytest -m gpu``. What they hold:

- the eager quantizer on the GPU gives the CPU's Ŵ and ∂L/∂W bit for bit and ∂L/∂α to summation
  order (every scheme, per row and per group, fp32 and bf16 Ŵ);
- the fused kernels on the GPU (the hand-written Triton kernels, the GPU default) give the eager
  quantizer's Ŵ and ∂L/∂W bit for bit, fp32 and bf16 weights, and their controls (a reciprocal
  division, rounding half away) do not; ``torch.compile``'s kernels do but for the rare value its
  division rounds otherwise;
- the tiny MiniCPM4 fixture, quantized at every bit width on the GPU, meets the official code's
  logits, loss and gradients (within the CPU tests' former tolerances: ``GPU_MINICPM_TOLERANCES``);
- ``paretoq train`` on the GPU logs the CPU run's losses (fp32), and trains under bf16 autocast
  with the fused quantizer and gradient accumulation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE, MINICPM_BITS, assert_quantized_minicpm_matches_official, train_argv
from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale
from paretoq.quant.fused import FusedKernels

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _deterministic_matmuls():
    """fp32 products in fp32 (no TF32), as on CPU."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _inputs(bits, group, dtype, shape=(384, 512), seed=0):
    gen = torch.Generator().manual_seed(seed + int(bits * 100) + (group or 0))
    w = torch.randn(*shape, generator=gen) * 0.02
    groups = 1 if group is None else shape[1] // group
    a = init_scale(w, SCHEMES[bits], group) * (0.5 + torch.rand(shape[0], groups, generator=gen))
    g = torch.randn(*shape, generator=gen).to(dtype)
    return w, a, g


def _run(w, a, g, bits, dtype, device, kernels=None):
    w = w.to(device).requires_grad_()
    a = a.to(device).requires_grad_()
    out = fake_quantize(w, a, SCHEMES[bits], dtype, kernels)
    out.backward(g.to(device))
    return out.detach().cpu(), w.grad.cpu(), a.grad.cpu()


def _assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0, msg="Ŵ")
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0, msg="∂L/∂W")
    # the same products summed in another order
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5 * float(expected[2].abs().max()), msg="∂L/∂α")


@pytest.mark.parametrize("bits", sorted(SCHEMES))
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_quantizer_on_gpu_equals_cpu(bits, group, dtype):
    w, a, g = _inputs(bits, group, dtype)
    _assert_same(_run(w, a, g, bits, dtype, "cuda"), _run(w, a, g, bits, dtype, "cpu"))


@pytest.mark.parametrize("bits", sorted(SCHEMES))
@pytest.mark.parametrize("group", [None, 64])
def test_scale_init_on_gpu_equals_cpu(bits, group):
    """Bit for bit (max|W|, max|W|/Qp), except the binary mean|W| (summed in another order): a scale one
    ulp off puts a row's largest weight outside the clip range and drops its gradient."""
    w, _, _ = _inputs(bits, group, torch.float32)
    on_gpu = init_scale(w.cuda(), SCHEMES[bits], group).cpu()
    torch.testing.assert_close(on_gpu, init_scale(w, SCHEMES[bits], group), rtol=1e-6 if bits == 1 else 0, atol=0)


def _assert_nearly_same(got, expected, scheme, a):
    """Triton's fp32 division is not correctly rounded (triton-lang/triton#10661): now and then x = W/α̃
    comes out an ulp off and, next to a rounding tie or a clip bound, lands on the next level or the
    other side of the mask. Measured on an H200 (quantizer_micro.py --device cuda): 2 of 4.2 million
    Ŵ values and 1 ∂L/∂W value. Allowed here: 1 + 1 in 100 000 such values, each Ŵ one level off;
    ∂L/∂α exact to summation order in every row or group without one."""
    w_diff, g_diff = got[0] != expected[0], got[1] != expected[1]
    assert int(w_diff.sum()) + int(g_diff.sum()) <= 1 + w_diff.numel() // 100_000
    step = float(scheme.levels().diff().max()) * float(a.max())
    assert float((got[0].float() - expected[0].float()).abs().max()) <= step * 1.01
    m, groups = expected[2].shape
    clean = ~(w_diff | g_diff).reshape(m, groups, -1).any(dim=-1)
    torch.testing.assert_close(got[2][clean], expected[2][clean], rtol=1e-5,
                               atol=1e-5 * float(expected[2].abs().max()), msg="∂L/∂α")


@pytest.mark.parametrize("bits", sorted(SCHEMES))
def test_fused_quantizer_on_gpu_is_bit_exact(bits):
    """The GPU default (``FusedKernels()`` on CUDA tensors: the Triton kernels of
    ``paretoq.quant.triton_kernels``): Ŵ and ∂L/∂W bit for bit, ∂L/∂α to summation order, on a
    shape that is no multiple of the kernels' blocks and on a 4096×1024 weight (4 million values,
    where ``torch.compile``'s division put 2 Ŵ values on another level: the test below)."""
    kernels = FusedKernels()
    for shape in ((384, 512), (200, 320), (4096, 1024)):
        for group in (None, 64):
            for dtype in (torch.float32, torch.bfloat16):
                w, a, g = _inputs(bits, group, dtype, shape=shape, seed=1)
                eager = _run(w, a, g, bits, dtype, "cuda")
                fused = _run(w, a, g, bits, dtype, "cuda", kernels)
                assert not kernels.failed, "the fused quantizer fell back to eager on the GPU"
                _assert_same(fused, eager)
                assert torch.equal(_bits(fused[0]), _bits(eager[0])) and torch.equal(_bits(fused[1]), _bits(eager[1]))
    assert kernels.calls == {"prebuilt": 0, "compiled": 0, "eager": 0, "triton": 24}  # 12 cases × forward, backward


def test_auto_picks_the_triton_kernels_for_cuda_layers():
    """``kernels="auto"`` (``paretoq train``'s default) on a model on the GPU: every quantized layer
    gets the fused kernels, and its calls go the Triton way."""
    from torch import nn

    from paretoq import QuantConfig, quantize_model
    from paretoq.quant import QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).cuda()
    quantize_model(model, QuantConfig(w_bits=4, group_size=32, include=[r"^\d+$"]), kernels="auto")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 and all(isinstance(m.kernels, FusedKernels) for m in layers)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randn(8, 64, device="cuda")).float().square().sum().backward()
    assert layers[0].kernels.calls == {"prebuilt": 0, "compiled": 0, "eager": 0, "triton": 4}


@pytest.mark.parametrize("bits", [2, 4])
def test_triton_kernels_on_gpu_bf16_weights_and_controls(bits):
    """bf16 master weights (read as fp32, ∂L/∂W rounded to bf16 once), and the controls: the kernels
    with x = W·(1/α̃) instead of W / α̃, on weights set on the clip bound and on rounding ties
    (W = level·α̃ and (level + ½ step)·α̃), give another Ŵ or ∂L/∂W; rounding half away does too."""
    from paretoq.quant import triton_kernels

    scheme = SCHEMES[bits]
    w, a, g = _inputs(bits, None, torch.bfloat16, shape=(512, 768), seed=2)
    wb = w.bfloat16().cuda()
    ac, gc = a.cuda(), g.cuda()
    expected = _run(wb.float().cpu(), a, g, bits, torch.bfloat16, "cpu")
    assert torch.equal(_bits(triton_kernels.forward(wb, ac, scheme, torch.bfloat16).cpu()), _bits(expected[0]))
    gw, ga = triton_kernels.backward(wb, ac, scheme, gc)
    assert gw.dtype == torch.bfloat16 and torch.equal(_bits(gw.cpu()), _bits(expected[1].bfloat16()))
    torch.testing.assert_close(ga.cpu(), expected[2], rtol=1e-5, atol=1e-5 * float(expected[2].abs().max()))
    # boundary weights: every x = W/α̃ is (nearly) a level, a tie or the clip bound
    lv = scheme.levels()
    edges = torch.cat([lv, (lv[1:] + lv[:-1]) / 2, torch.tensor([scheme.lo, scheme.hi])])
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(4096, 1, generator=gen) * 0.01 + 1e-3
    w = edges[torch.randint(len(edges), (4096, 1024), generator=gen)] * a
    nudge = torch.randint(3, w.shape, generator=gen)  # a third one ulp up, a third one ulp down
    w = torch.where(nudge == 0, w, torch.nextafter(w, torch.where(nudge == 1, float("inf"), -float("inf"))))
    g = torch.randn(4096, 1024, generator=gen)
    eager = _run(w, a, g, bits, torch.float32, "cuda")
    right = (triton_kernels.forward(w.cuda(), a.cuda(), scheme, torch.float32).cpu(),
             triton_kernels.backward(w.cuda(), a.cuda(), scheme, g.cuda())[0].cpu())
    assert torch.equal(right[0], eager[0]) and torch.equal(right[1], eager[1])
    for variant in ({"division": "reciprocal"}, {"rounding": "half_away"}):
        wrong = (triton_kernels.forward(w.cuda(), a.cuda(), scheme, torch.float32, **variant).cpu(),
                 triton_kernels.backward(w.cuda(), a.cuda(), scheme, g.cuda(), **variant)[0].cpu())
        assert not (torch.equal(wrong[0], eager[0]) and torch.equal(wrong[1], eager[1])), variant


@pytest.mark.parametrize("bits", sorted(SCHEMES))
def test_torch_compile_quantizer_on_gpu_is_nearly_eager(bits):
    """What the Triton kernels replace: ``torch.compile``'s kernels (``FusedKernels(triton=False)``)
    give the eager values but for the rare one Triton's approximate division puts elsewhere."""
    kernels = FusedKernels(triton=False)  # off the CPU: torch.compile
    for group in (None, 64):
        for dtype in (torch.float32, torch.bfloat16):
            w, a, g = _inputs(bits, group, dtype, seed=1)
            eager = _run(w, a, g, bits, dtype, "cuda")
            fused = _run(w, a, g, bits, dtype, "cuda", kernels)
            assert not kernels.failed, "the fused quantizer fell back to eager on the GPU"
            _assert_nearly_same(fused, eager, SCHEMES[bits], a)
    assert kernels.calls == {"prebuilt": 0, "compiled": 8, "eager": 0, "triton": 0}  # 2 layouts × 2 dtypes × forward, backward


def _bits(t):
    """The raw bits of a float tensor (±0 and nan payloads told apart)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# The tolerances the CPU tests used before they were set from measured errors (tests/conftest.py); an H200
# met these (2026-12-04). The GPU's errors have not been measured since: until they are, these stand.
GPU_MINICPM_TOLERANCES = dict(logits_atol=1e-4, loss_atol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize("tag", list(MINICPM_BITS))
def test_minicpm_fixture_on_gpu_matches_official(tag, ref):
    from transformers import AutoModelForCausalLM

    from paretoq import QuantConfig, quantize_model

    model = AutoModelForCausalLM.from_pretrained(FIXTURE, attn_implementation="eager", dtype=torch.float32).eval()
    quantize_model(model.cuda(), QuantConfig(w_bits=MINICPM_BITS[tag]))
    assert_quantized_minicpm_matches_official(model, ref, tag, **GPU_MINICPM_TOLERANCES)


def _train(out, *extra):
    from paretoq.cli import main as cli

    assert cli(["train", *train_argv(out, *extra, steps=6, save_steps=6, report_to=None)]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    results = json.loads((out / "all_results.json").read_text())
    return [h["loss"] for h in history if "loss" in h], results


def test_train_on_gpu_logs_the_cpu_losses(tmp_path):
    gpu, gpu_results = _train(tmp_path / "gpu", "--compile_quantizer", "false")
    cpu, cpu_results = _train(tmp_path / "cpu", "--use_cpu", "true", "--compile_quantizer", "false")
    assert len(gpu) == len(cpu) == 6
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-4)  # before any update: the same model and batch
    assert gpu == pytest.approx(cpu, rel=2e-3)  # products summed in another order, for 6 steps
    assert gpu_results["eval_loss"] == pytest.approx(cpu_results["eval_loss"], rel=2e-3)
    tensors = load_file(tmp_path / "gpu" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight_clip_val"].shape == (128, 1)


def test_train_on_gpu_bf16_fused_with_accumulation(tmp_path):
    fp32, _ = _train(tmp_path / "fp32", "--compile_quantizer", "false")
    bf16, results = _train(tmp_path / "bf16", "--bf16", "true", "--compile_quantizer", "auto",  # the Triton kernels
                           "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "1")
    assert len(bf16) == 6 and all(map(torch.isfinite, map(torch.tensor, bf16)))
    # the same two sequences per step, as one batch of 2 in fp32 or two micro-batches of 1 under bf16 autocast
    assert bf16 == pytest.approx(fp32, rel=3e-2)
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
