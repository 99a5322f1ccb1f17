"""The fused quantizer (``paretoq.quant.fused``) against the eager one, and how its kernels are made.

Same Ŵ and ∂L/∂W bits as the eager quantizer, ∂L/∂α to summation order, on both paths: the CPU
kernels built ahead of time (the ``fused`` fixture) and ``torch.compile`` (what other devices
take; forced here on CPU tensors with ``ahead_of_time=False``). Every equality test also checks
``FusedKernels.calls``: a call the kernels do not take runs the eager math with the same numbers,
so without the count a test could pass without any kernel having run. Then the build cache (built
once and reused, a damaged file built again, a failed build is one warning and the eager math) and
a training process that never imports Inductor's compiler.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paretoq.quant import QuantConfig, QuantLinear, quantize_model, set_kernels
from paretoq.quant import fused as fused_lib
from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale, quantize_weight
from paretoq.quant.fused import FusedKernels
from paretoq.quant.linear import flush_fake_quant_grads, set_fake_quant_cache

REPO = Path(__file__).resolve().parents[2]
F32, BF16 = torch.float32, torch.bfloat16


def _grads(w, a, scheme, dtype, g, kernels=None):
    w, a = w.clone().requires_grad_(), a.clone().requires_grad_()
    out = fake_quantize(w, a, scheme, dtype, kernels)
    out.backward(g)
    return out.detach(), w.grad, a.grad


def _assert_same(fast, slow):
    """Ŵ and ∂L/∂W bit for bit; ∂L/∂α the same products summed in another order (cancellation makes
    small sums differ relatively more)."""
    assert fast[0].dtype == slow[0].dtype and torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[2], slow[2], rtol=2e-6, atol=2e-6 * float(slow[2].abs().max()))


def _inputs(shape, bits, group, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) * 0.05
    a = init_scale(w, SCHEMES[bits], group) * (0.5 + torch.rand(shape[0], shape[1] // (group or shape[1]), generator=gen))
    return w, a, torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("bits", sorted(SCHEMES))
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("path", ["prebuilt", "compiled"])
def test_fused_matches_eager(bits, group, path, request):
    kernels = request.getfixturevalue("fused") if path == "prebuilt" else FusedKernels(ahead_of_time=False)
    for shape, dtype in (((48, 64), F32), ((32, 96), BF16)):
        w, a, g = _inputs(shape, bits, group, dtype, int(bits * 100) + (group or 0))
        _assert_same(_grads(w, a, SCHEMES[bits], dtype, g, kernels), _grads(w, a, SCHEMES[bits], dtype, g))
    assert kernels.calls == {"prebuilt": 0, "compiled": 0, "eager": 0, "triton": 0, path: 4}  # 2 shapes × forward, backward


def test_layers_of_many_shapes_share_one_kernel(fused):
    scheme = SCHEMES[2]
    shapes = ((32, 32), (48, 64), (64, 48), (40, 200), (200, 40), (2, 2), (24, 72))
    for rows, cols in shapes:
        w, a, g = _inputs((rows, cols), 2, None, BF16, rows + cols)
        _assert_same(_grads(w, a, scheme, BF16, g, fused), _grads(w, a, scheme, BF16, g))
    assert fused.loaded() == [("forward", scheme, BF16, None), ("backward", scheme, BF16, False)]
    assert fused.calls == {"prebuilt": 2 * len(shapes), "compiled": 0, "eager": 0, "triton": 0}


def test_rows_longer_than_4096_get_their_own_backward(fused):
    """Inductor sums long rows in chunks and compiles that choice in: each size regime has its kernel,
    exported for exactly its range of row lengths."""
    scheme = SCHEMES[4]
    w, a, g = _inputs((8, 4224), 4, None, BF16, 7)
    _assert_same(_grads(w, a, scheme, BF16, g, fused), _grads(w, a, scheme, BF16, g))
    assert fused.loaded() == [("forward", scheme, BF16, None), ("backward", scheme, BF16, True)]
    assert fused.calls == {"prebuilt": 2, "compiled": 0, "eager": 0, "triton": 0}
    jobs = [fused_lib.job(("backward", scheme, BF16, long)) for long in (False, True)]
    assert [j["dims"]["cols"] for j in jobs] == [[2, 4096], [4097, None]]


def test_calls_the_kernels_do_not_take_run_the_eager_math(fused):
    """A column-major or one-row weight, a strided scale, a bf16 weight: the eager math, same numbers."""
    scheme = SCHEMES[2]
    full = torch.randn(40, 48) * 0.05
    cases = [full.t().contiguous().t()[:, :40], full[:1], full.bfloat16()]  # strides (1, 40); one row; bf16
    for w in cases:
        a = init_scale(w, scheme, None)
        g = torch.randn(w.shape).to(BF16)
        _assert_same(_grads(w, a, scheme, BF16, g, fused), _grads(w, a, scheme, BF16, g))
    a = init_scale(full, scheme, None).repeat(1, 2)[:, :1]  # (40, 1) with strides (2, 1)
    assert not a.is_contiguous()
    assert torch.equal(quantize_weight(full, a, scheme, BF16, kernels=fused), quantize_weight(full, a, scheme, BF16))
    assert fused.calls == {"prebuilt": 0, "compiled": 0, "eager": 2 * len(cases) + 1, "triton": 0}
    assert fused.loaded() == [] and not fused.failed


def test_unregistered_schemes_go_through_torch_compile(fused):
    """Only the schemes of ``SCHEMES`` (or equal copies) can be rebuilt by a child; another scheme is compiled."""
    from dataclasses import replace

    scheme = replace(SCHEMES[3], name="lsq-variant")
    w, a, g = _inputs((24, 40), 3, None, F32, 3)
    _assert_same(_grads(w, a, scheme, F32, g, fused), _grads(w, a, scheme, F32, g))
    assert fused.calls == {"prebuilt": 0, "compiled": 2, "eager": 0, "triton": 0}


def test_quant_linear_runs_its_kernels_in_every_quantizer_call(fused):
    """Forward, the recomputed backward (fp32) and, under bf16 autocast with the fake-quant cache, Ŵ
    once per step and the flush: every quantizer call of a layer takes the layer's kernels."""
    torch.manual_seed(0)
    eager = QuantLinear(64, 48, config=QuantConfig(w_bits=2, group_size=16))
    fast = copy.deepcopy(eager)  # (its scheme a copy of SCHEMES[2]: the same kernels)
    assert set_kernels(fast, fused) is fused and fast.kernels is fused and eager.kernels is None
    x = torch.randn(3, 5, 64, requires_grad=True)  # ∂L/∂x: the backward recomputes Ŵ
    grads = []
    for layer in (fast, eager):
        x.grad = None
        y = layer(x)  # fp32: _RecomputedQuantLinear (Ŵ forward; Ŵ again and the quantizer backward in backward)
        y.square().sum().backward()
        grads.append((y.detach(), layer.weight.grad.clone(), layer.weight_clip_val.grad.clone(), x.grad))
    assert all(torch.equal(grads[0][i], grads[1][i]) for i in (0, 1, 3))
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=2e-6, atol=2e-6 * float(grads[1][2].abs().max()))
    assert fused.calls == {"prebuilt": 3, "compiled": 0, "eager": 0, "triton": 0}
    for layer in (fast, eager):
        layer.zero_grad(set_to_none=True)
        set_fake_quant_cache(layer)
        for _ in range(2):  # two micro-batches: Ŵ once, the flush once
            with torch.autocast("cpu", dtype=BF16):
                layer(x).float().square().sum().backward()
        flush_fake_quant_grads(layer)
    assert torch.equal(fast.weight.grad, eager.weight.grad)
    torch.testing.assert_close(fast.weight_clip_val.grad, eager.weight_clip_val.grad, rtol=2e-6,
                               atol=2e-6 * float(eager.weight_clip_val.grad.abs().max()))
    assert fused.calls == {"prebuilt": 5, "compiled": 0, "eager": 0, "triton": 0}


def test_quantize_model_and_set_kernels_choose_per_model(fused):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))

    eager, fast = model(), model()
    quantize_model(eager, QuantConfig(w_bits=2, include=[r"^\d+$"]))
    quantize_model(fast, QuantConfig(w_bits=2, include=[r"^\d+$"]), kernels="fused")
    layers = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert all(m.kernels is None for m in eager.modules() if isinstance(m, QuantLinear))  # the default: eager
    assert len(layers) == 2 and isinstance(layers[0].kernels, FusedKernels) and layers[1].kernels is layers[0].kernels
    x = torch.randn(4, 32)
    assert torch.equal(fast(x), eager(x)) and layers[0].kernels.calls["prebuilt"] == 2
    assert set_kernels(fast, "eager") is None and all(m.kernels is None for m in layers)
    assert isinstance(set_kernels(fast, "auto"), FusedKernels)  # CPU weights: fused
    set_kernels(fast, fused)
    assert copy.deepcopy(fast)[0].kernels is fused  # a copy shares them; a pickled one gets fresh ones
    restored = pickle.loads(pickle.dumps(fast))[0].kernels
    assert isinstance(restored, FusedKernels) and restored is not fused
    meta = model().to("meta")
    assert quantize_model(meta, QuantConfig(w_bits=2, include=[r"^\d+$"]), init_scales=False, kernels="auto").num_layers == 2
    assert all(m.kernels is None for m in meta.modules() if isinstance(m, QuantLinear))  # not on the CPU: eager
    plain = model()
    with pytest.raises(ValueError, match="kernels='triton'"):
        quantize_model(plain, QuantConfig(w_bits=2, include=[r"^\d+$"]), kernels="triton")
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())  # refused before any swap


def test_a_failure_falls_back_to_eager_once(fused, monkeypatch, caplog):
    def no_compiler(job):
        raise fused_lib.BuildError("g++: not found\nmore detail")

    monkeypatch.setattr(fused_lib, "load", no_compiler)
    kernels = FusedKernels()
    w, a, g = _inputs((8, 16), 2, None, F32, 1)
    with caplog.at_level(logging.WARNING, logger="paretoq.quant.fused"):
        got = [_grads(w, a, SCHEMES[2], F32, g, kernels) for _ in range(2)]
    assert kernels.failed and kernels.calls == {"prebuilt": 0, "compiled": 0, "eager": 4, "triton": 0}
    assert [r.getMessage() for r in caplog.records] == [
        "fused quantizer kernels unavailable (BuildError: g++: not found); using the eager quantizer"]
    for fast in got:
        assert all(torch.equal(x, y) for x, y in zip(fast, _grads(w, a, SCHEMES[2], F32, g)))
    assert not fused.failed  # the failure is that object's, nobody else's


def test_prebuild_returns_none_with_one_warning_when_kernels_cannot_be_built(monkeypatch, caplog):
    def no_compiler(jobs):
        raise fused_lib.BuildError("g++: not found")

    monkeypatch.setattr(fused_lib, "build", no_compiler)
    monkeypatch.setattr(fused_lib, "_PACKAGES", {})
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", "/nonexistent/paretoq-kernels")
    with caplog.at_level(logging.WARNING, logger="paretoq.quant.fused"):
        assert fused_lib.prebuild([SCHEMES[2]], BF16) is None
    assert [r.getMessage() for r in caplog.records] == [
        "fused quantizer kernels unavailable (BuildError: g++: not found); using the eager quantizer"]


def test_kernels_on_disk_are_loaded_not_built_again(prebuilt_kernels, monkeypatch):
    def no_build(jobs):
        raise AssertionError(f"built again: {jobs}")

    monkeypatch.setattr(fused_lib, "build", no_build)
    monkeypatch.setattr(fused_lib, "_PACKAGES", {})  # as in a new process
    kernels = FusedKernels()
    assert kernels.load(prebuilt_kernels) == 0 and kernels.loaded() == prebuilt_kernels
    w, a, g = _inputs((16, 32), 4, None, BF16, 4)
    _assert_same(_grads(w, a, SCHEMES[4], BF16, g, kernels), _grads(w, a, SCHEMES[4], BF16, g))
    assert kernels.calls["prebuilt"] == 2


def test_a_damaged_cache_file_is_built_again(prebuilt_kernels, tmp_path, monkeypatch):
    key = ("forward", SCHEMES[3], BF16, None)
    good = Path(fused_lib.job(key)["path"])  # in the real cache (the fixture built it)
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", str(tmp_path))
    job = fused_lib.job(key)
    assert Path(job["path"]) == tmp_path / good.name
    Path(job["path"]).write_bytes(b"not a kernel")
    built = []

    def build(jobs):  # the real build is the fixture's; here: the file it would write
        built.append([j["path"] for j in jobs])
        Path(jobs[0]["path"]).write_bytes(good.read_bytes())

    monkeypatch.setattr(fused_lib, "build", build)
    kernels = FusedKernels()
    w = torch.randn(16, 32) * 0.05
    a = init_scale(w, SCHEMES[3], None)
    assert torch.equal(quantize_weight(w, a, SCHEMES[3], BF16, kernels=kernels), quantize_weight(w, a, SCHEMES[3], BF16))
    assert built == [[job["path"]]] and kernels.calls["prebuilt"] == 1


def test_cache_keys_name_what_a_kernel_serves():
    keys = [("backward", SCHEMES[2], BF16, False), ("backward", SCHEMES[2], BF16, True),
            ("backward", SCHEMES[2], F32, False), ("backward", SCHEMES[4], BF16, False), ("forward", SCHEMES[2], BF16, None)]
    jobs = [fused_lib.job(k) for k in keys]
    assert len({j["path"] for j in jobs}) == len(keys)
    assert jobs[0]["args"][2] == {"const": {"scheme": 2}}
    assert jobs[0]["args"][3] == {"tensor": "bfloat16", "shape": ["rows", "cols"]}
    assert jobs[4]["args"][3] == {"const": {"dtype": "bfloat16"}}
    assert jobs[1]["sizes"] == {"rows": 8, "cols": 4104}
    assert jobs[0] == fused_lib.job(keys[0])  # stable
    assert Path(jobs[0]["path"]).parent == fused_lib.cache_dir()


def test_a_failed_build_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", str(tmp_path))
    job = {**fused_lib.job(("forward", SCHEMES[2], BF16, None)), "fn": "paretoq.quant.fused:_missing"}
    with pytest.raises(fused_lib.BuildError, match=r"^AttributeError: module 'paretoq.quant.fused' has no "
                                                   r"attribute '_missing'$"):
        fused_lib.build([job])
    assert list(tmp_path.iterdir()) == []


def test_a_training_process_never_imports_the_compiler(prebuilt_kernels):
    """What the kernels are built ahead for: a QAT step under bf16 autocast on CPU, in a process
    that has imported transformers' Trainer (as every training run has), loads the kernels and
    runs them without importing Inductor's compiler."""
    code = """
import json, sys, torch
import transformers.trainer
from paretoq.quant.fused import FusedKernels
from paretoq.quant.functional import SCHEMES, init_scale, fake_quantize
kernels = FusedKernels()
w = torch.nn.Parameter(torch.randn(64, 48) * 0.05)
a = torch.nn.Parameter(init_scale(w.detach(), SCHEMES[2], None))
x = torch.randn(4, 48)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = x @ fake_quantize(w, a, SCHEMES[2], torch.bfloat16, kernels).t()
y.float().sum().backward()
print(json.dumps({"compile_fx": "torch._inductor.compile_fx" in sys.modules, "calls": kernels.calls,
                  "loaded": len(kernels.loaded())}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "compile_fx": False, "calls": {"prebuilt": 2, "compiled": 0, "eager": 0, "triton": 0}, "loaded": 2}


@pytest.mark.parametrize("group", [None, 8])
def test_compiled_layers_of_many_shapes_share_one_compilation(group):
    """The ``torch.compile`` path: parameters go in detached (``torch.compile`` would specialise on
    each parameter's shape), so after the first shapes every layer shape reuses the compilation."""
    scheme, kernels = SCHEMES[2], FusedKernels(ahead_of_time=False)

    def step(rows, cols):
        w = nn.Parameter(torch.randn(rows, cols) * 0.05)
        a = nn.Parameter(init_scale(w.detach(), scheme, group))
        fake_quantize(w, a, scheme, BF16, kernels).float().sum().backward()
        assert w.grad is not None and a.grad is not None

    step(32, 32)
    step(48, 64)  # a square first shape makes its two sizes one symbol: the next shape recompiles, once
    with torch.compiler.set_stance("fail_on_recompile"):
        for rows, cols in ((64, 48), (96, 32), (40, 200), (200, 40), (128, 128), (56, 88), (72, 24), (24, 72)):
            step(rows, cols)
    assert not kernels.failed and kernels.calls == {"prebuilt": 0, "compiled": 20, "eager": 0, "triton": 0}


def test_a_recompile_under_fail_on_recompile_is_caught_by_the_test_above():
    """The guard of the test above works: a compilation it forbids ends in the eager fallback."""
    scheme, kernels = SCHEMES[2], FusedKernels(ahead_of_time=False)
    w = torch.randn(24, 40) * 0.05
    a = init_scale(w, scheme, None)
    quantize_weight(w, a, scheme, BF16, kernels=kernels)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(quantize_weight(w, a, scheme, torch.float16, kernels=kernels),
                           quantize_weight(w, a, scheme, torch.float16))  # fp16 Ŵ: a new compilation
    assert kernels.failed and kernels.calls == {"prebuilt": 0, "compiled": 1, "eager": 1, "triton": 0}


@pytest.mark.parametrize("bits", sorted(SCHEMES))
def test_kernels_trace_as_one_graph_for_tensors_off_the_cpu(bits):
    """The traced functions make one graph for another device's tensors too (meta tensors stand in for
    a GPU's here; ``fullgraph=True`` raises on a graph break). The SEQ schemes' eager path adds 0-d
    CPU constants, which an untraced op takes with any device's tensor but tracing does not."""
    scheme = SCHEMES[bits]
    w, a = torch.empty(40, 24, device="meta"), torch.empty(40, 1, device="meta")
    g, s_g = torch.empty(40, 24, device="meta", dtype=BF16), torch.empty((), device="meta")
    forward = torch.compile(fused_lib._forward, dynamic=True, fullgraph=True, backend="eager")
    backward = torch.compile(fused_lib._backward, dynamic=True, fullgraph=True, backend="eager")
    with fused_lib._compile_settings():  # the other tests' compilations of these functions count too
        w_hat = forward(w, a, scheme, BF16)
        gw, ga = backward(w, a, scheme, g, s_g)
    assert (w_hat.device.type, w_hat.dtype, w_hat.shape) == ("meta", BF16, (40, 24))
    assert (gw.shape, ga.shape, gw.dtype, ga.dtype) == ((40, 24), (40, 1), F32, F32)


def test_inside_a_compiled_caller_the_formulas_are_traced_into_its_graph(fused):
    """A caller's own ``torch.compile`` (here of a whole Linear) traces the plain formulas: one graph,
    the same Ŵ, and no kernel call counted."""
    layer = QuantLinear(32, 24, config=QuantConfig(w_bits=4))
    set_kernels(layer, fused)
    x = torch.randn(5, 32)
    compiled = torch.compile(lambda x: F.linear(x, layer.quantized_weight()), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), F.linear(x, fake_quantize(layer.weight, layer.weight_clip_val, layer.scheme)))
    assert fused.calls == {"prebuilt": 0, "compiled": 0, "eager": 0, "triton": 0}
