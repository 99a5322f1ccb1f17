"""Kernels built ahead of time (``paretoq.quant.prebuilt``): the CPU path of the fused quantizer.

Same numbers as the eager quantizer (the sweep over every scheme is ``test_compiled.py``'s), one
kernel for every layer shape, inputs the kernel was not built for run eager, a damaged cache file is
rebuilt, a failed build is one line, and a training process never imports torch's compiler."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paretoq.quant import compiled, prebuilt
from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale

REPO = Path(__file__).resolve().parents[2]
F32, BF16 = torch.float32, torch.bfloat16


def _grads(w, a, scheme, dtype, g):
    w, a = w.clone().requires_grad_(), a.clone().requires_grad_()
    out = fake_quantize(w, a, scheme, dtype)
    out.backward(g)
    return out.detach(), w.grad, a.grad


def _eager(w, a, scheme, dtype, g):
    compiled.enable(False)
    try:
        return _grads(w, a, scheme, dtype, g)
    finally:
        compiled.enable(True)


def test_layers_of_many_shapes_share_one_kernel(fused):
    scheme = SCHEMES[2]
    compiled.FORWARD_CPU.forget()
    compiled.BACKWARD_CPU.forget()
    for rows, cols in ((32, 32), (48, 64), (64, 48), (40, 200), (200, 40), (2, 2), (24, 72)):
        w = torch.randn(rows, cols) * 0.05
        a = init_scale(w, scheme, None)
        g = torch.randn(rows, cols).to(BF16)
        fast, slow = _grads(w, a, scheme, BF16, g), _eager(w, a, scheme, BF16, g)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
        torch.testing.assert_close(fast[2], slow[2], rtol=2e-6, atol=2e-6 * float(slow[2].abs().max()))
    assert compiled.FORWARD_CPU.loaded() == [(F32, F32, scheme, BF16)]
    assert compiled.BACKWARD_CPU.loaded() == [(F32, F32, scheme, BF16, F32, False)]


def test_rows_longer_than_4096_get_their_own_backward(fused):
    """Inductor sums long rows in chunks and compiles that choice in: a short-row kernel refuses them."""
    scheme = SCHEMES[4]
    w = torch.randn(8, 4224) * 0.05
    a = init_scale(w, scheme, None)
    g = torch.randn(8, 4224).to(BF16)
    fast, slow = _grads(w, a, scheme, BF16, g), _eager(w, a, scheme, BF16, g)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    torch.testing.assert_close(fast[2], slow[2], rtol=2e-6, atol=2e-6 * float(slow[2].abs().max()))
    assert (F32, F32, scheme, BF16, F32, True) in compiled.BACKWARD_CPU.loaded()


def test_inputs_the_kernel_was_not_built_for_run_the_eager_math(fused):
    """A strided or one-row weight goes to the eager math before the kernel; any other input the kernel
    was not built for (here a strided scale) is refused by AOTInductor's own check, which this module
    turns on, instead of being read as the compiled layout."""
    scheme = SCHEMES[2]
    compiled.FORWARD_CPU.forget()
    full = torch.randn(40, 48) * 0.05
    for w in (full.t().contiguous().t()[:, :40], full[:1]):  # column-major (strides (1, 40)); one row
        a = init_scale(w, scheme, None)
        assert torch.equal(compiled.FORWARD_CPU(w, a, scheme, BF16), compiled._forward(w, a, scheme, BF16))
    assert compiled.FORWARD_CPU.loaded() == []
    w = full.contiguous()
    a = init_scale(w, scheme, None).repeat(1, 2)[:, :1]  # (40, 1) with strides (2, 1)
    assert not a.is_contiguous()
    assert torch.equal(compiled.FORWARD_CPU(w, a, scheme, BF16), compiled._forward(w, a, scheme, BF16))
    assert compiled.FORWARD_CPU.loaded() == [(F32, F32, scheme, BF16)]  # loaded, and it refused the call


def test_a_damaged_cache_file_is_built_again(prebuilt_kernels, tmp_path, monkeypatch):
    key = (F32, F32, SCHEMES[3], BF16)
    good = Path(compiled.FORWARD_CPU.job(key)["path"])  # in the real cache (the fixture built it)
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", str(tmp_path))
    fn = prebuilt.Prebuilt(compiled._forward, compiled.FORWARD_CPU.shapes, other=compiled.FORWARD,
                           examples=compiled.FORWARD_CPU.examples)
    job = fn.job(key)
    assert Path(job["path"]) == tmp_path / good.name
    Path(job["path"]).write_bytes(b"not a kernel")
    built = []

    def build(jobs):  # the real build is test_compiled's; here: the file it would write
        built.append([j["path"] for j in jobs])
        Path(jobs[0]["path"]).write_bytes(good.read_bytes())

    monkeypatch.setattr(prebuilt, "build", build)
    w = torch.randn(16, 32) * 0.05
    a = init_scale(w, SCHEMES[3], None)
    assert torch.equal(fn(w, a, SCHEMES[3], BF16), compiled._forward(w, a, SCHEMES[3], BF16))
    assert built == [[job["path"]]]


def test_cache_keys_name_what_a_kernel_serves():
    jobs = [compiled.BACKWARD_CPU.job(k) for k in ((F32, F32, SCHEMES[2], BF16, F32, False),
                                                   (F32, F32, SCHEMES[2], BF16, F32, True),
                                                   (F32, F32, SCHEMES[2], F32, F32, False),
                                                   (F32, F32, SCHEMES[4], BF16, F32, False))]
    assert len({j["path"] for j in jobs}) == 4
    assert jobs[0]["args"][2] == {"const": {"scheme": 2}} and jobs[0]["args"][3] == {"tensor": "bfloat16",
                                                                                     "shape": ["rows", "cols"]}
    assert jobs[1]["sizes"] == {"rows": 8, "cols": 4104}
    assert jobs[0] == compiled.BACKWARD_CPU.job((F32, F32, SCHEMES[2], BF16, F32, False))  # stable


def test_a_failed_build_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_KERNEL_CACHE", str(tmp_path))
    job = {**compiled.FORWARD_CPU.job((F32, F32, SCHEMES[2], BF16)), "fn": "paretoq.quant.compiled:_missing"}
    with pytest.raises(prebuilt.BuildError, match=r"^AttributeError: module 'paretoq.quant.compiled' has no "
                                                  r"attribute '_missing'$"):
        prebuilt.build([job])
    assert list(tmp_path.iterdir()) == []


def test_prebuild_falls_back_to_eager_when_kernels_cannot_be_built(monkeypatch, caplog):
    def no_compiler(calls):
        raise prebuilt.BuildError("g++: not found")

    monkeypatch.setattr(prebuilt, "prepare", no_compiler)
    compiled.enable(True)
    try:
        with caplog.at_level(logging.WARNING, logger="paretoq.quant.compiled"):
            compiled.prebuild([SCHEMES[2]], BF16)
        assert not compiled.enabled()
    finally:
        compiled.enable(False)
    assert [r.getMessage() for r in caplog.records] == [
        "compiled quantizer unavailable (BuildError: g++: not found); using the eager quantizer"]


def test_a_training_process_never_imports_the_compiler(prebuilt_kernels):
    """What the kernels are built ahead for: a QAT step under bf16 autocast on CPU, in a process
    that has imported transformers' Trainer (as every training run has), loads no Inductor compiler."""
    code = """
import json, sys, torch
import transformers.trainer
from paretoq.quant import compiled
from paretoq.quant.functional import SCHEMES, init_scale, fake_quantize
compiled.enable(True)
before = set(sys.modules)
w = torch.nn.Parameter(torch.randn(64, 48) * 0.05)
a = torch.nn.Parameter(init_scale(w.detach(), SCHEMES[2], None))
x = torch.randn(4, 48)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = x @ fake_quantize(w, a, SCHEMES[2], torch.bfloat16).t()
y.float().sum().backward()
print(json.dumps({"new": sorted(m for m in set(sys.modules) - before if m.startswith("torch._inductor")),
                  "compile_fx": "torch._inductor.compile_fx" in sys.modules, "enabled": compiled.enabled(),
                  "loaded": len(compiled.FORWARD_CPU.loaded()) + len(compiled.BACKWARD_CPU.loaded())}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"new": [], "compile_fx": False, "enabled": True,
                                                                "loaded": 2}
