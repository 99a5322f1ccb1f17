"""The fused quantizer against the eager one: same Ŵ and ∂L/∂W bits, ∂L/∂α to summation order, and
a clean fallback when compiling fails. On CPU tensors it runs the kernels built ahead of time
(``prebuilt.py``, the ``fused`` fixture); ``fused_jit`` puts it on the ``torch.compile`` path
(``kernel.Kernel``) that other devices take."""

from __future__ import annotations

import logging

import pytest
import torch

from paretoq.quant import compiled
from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale
from paretoq.quant.kernel import Kernel


@pytest.fixture
def fused_jit():
    compiled.enable(True)
    compiled.functional._FUSED.forward_fn = compiled.FORWARD
    compiled.functional._FUSED.backward_fn = compiled.BACKWARD
    yield
    compiled.enable(False)


def _grads(w, a, scheme, dtype, g):
    w, a = w.clone().requires_grad_(), a.clone().requires_grad_()
    out = fake_quantize(w, a, scheme, dtype)
    out.backward(g)
    return out.detach(), w.grad, a.grad


@pytest.mark.parametrize("bits", sorted(SCHEMES))
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("path", ["prebuilt", "jit"])
def test_compiled_matches_eager(bits, group, path, request):
    request.getfixturevalue("fused" if path == "prebuilt" else "fused_jit")
    kernels = compiled.functional._FUSED.forward_fn, compiled.functional._FUSED.backward_fn
    scheme = SCHEMES[bits]
    gen = torch.Generator().manual_seed(int(bits * 100) + (group or 0))
    for shape, dtype in (((48, 64), torch.float32), ((32, 96), torch.bfloat16)):
        w = torch.randn(*shape, generator=gen) * 0.05
        a = init_scale(w, scheme, group) * (0.5 + torch.rand(shape[0], shape[1] // (group or shape[1]), generator=gen))
        g = torch.randn(*shape, generator=gen).to(dtype)
        fast = _grads(w, a, scheme, dtype, g)
        compiled.enable(False)
        slow = _grads(w, a, scheme, dtype, g)
        compiled.enable(True)
        compiled.functional._FUSED.forward_fn, compiled.functional._FUSED.backward_fn = kernels
        assert fast[0].dtype == dtype and torch.equal(fast[0], slow[0])
        assert torch.equal(fast[1], slow[1])
        # the same products summed in another order: cancellation makes small sums differ relatively more
        torch.testing.assert_close(fast[2], slow[2], rtol=2e-6, atol=2e-6 * float(slow[2].abs().max()))


def test_compile_failure_falls_back_to_eager_once(fused, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler\nmore detail")

    compiled.functional._FUSED.forward_fn = broken
    w, a = torch.randn(8, 16), torch.full((8, 1), 0.5)
    with caplog.at_level(logging.WARNING, logger="paretoq.quant.compiled"):
        out = fake_quantize(w, a, SCHEMES[2])
    assert not compiled.enabled()
    assert [r.getMessage() for r in caplog.records] == [
        "compiled quantizer unavailable (RuntimeError: no C++ compiler); using the eager quantizer"]
    assert torch.equal(out, fake_quantize(w, a, SCHEMES[2]))


@pytest.mark.parametrize("group, autocast", [(None, False), (8, True)])
def test_layers_of_many_shapes_share_one_compilation(group, autocast, fused_jit):
    """Parameters go in detached: Dynamo would otherwise specialise on each parameter's shape and,
    past its recompile limit, silently run the eager code. The first weight is square: with Dynamo's
    "duck sizing" its equal dimensions would become one symbol and the next shape recompile."""
    import torch._dynamo

    scheme = SCHEMES[2]

    def step(rows, cols):
        w = torch.nn.Parameter(torch.randn(rows, cols) * 0.05)
        a = torch.nn.Parameter(init_scale(w.detach(), scheme, group))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fake_quantize(w, a, scheme, torch.bfloat16 if autocast else None)
        out.float().sum().backward()
        assert w.grad is not None and a.grad is not None

    compiled.forget()  # earlier tests' compilations would answer
    step(32, 32)  # the one compilation of forward and backward
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows, cols in ((48, 64), (64, 48), (96, 32), (40, 200), (200, 40), (128, 128), (56, 88),
                           (88, 56), (72, 24), (24, 72)):
            step(rows, cols)
    assert compiled.enabled()  # a recompile would have raised, and the quantizer fallen back to eager


def test_enabling_again_reuses_the_compiled_kernels(fused_jit):
    """Dynamo keys its cache on the backend: kernels made anew per ``enable`` would compile each time
    and, past the recompile limit (8), run eager code."""
    import torch._dynamo

    w = torch.nn.Parameter(torch.randn(24, 40) * 0.05)
    a = torch.nn.Parameter(init_scale(w.detach(), SCHEMES[2], None))
    compiled.forget()
    fake_quantize(w, a, SCHEMES[2], torch.bfloat16).float().sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(10):
            compiled.enable(True)
            fake_quantize(w, a, SCHEMES[2], torch.bfloat16).float().sum().backward()
            assert compiled.enabled()


def test_kernels_take_no_per_call_float_inputs(fused_jit):
    """Python floats (α̃'s floor 1e-5) are compiled in as constants: by default Dynamo passes a float
    into the graph as a 0-d tensor it builds on every call."""
    seen = []

    def record(gm, example_inputs, graphs):
        seen.append([(tuple(x.shape), x.dtype) for x in example_inputs if isinstance(x, torch.Tensor)])
        return gm.forward

    import torch._dynamo

    torch._dynamo.reset()  # Dynamo's cache is per function, whatever the backend: start empty
    quantizer = compiled.functional._FUSED
    quantizer.forward_fn = Kernel(compiled._forward, record)
    quantizer.backward_fn = Kernel(compiled._backward, record)
    w = torch.nn.Parameter(torch.randn(16, 32) * 0.05)
    a = torch.nn.Parameter(init_scale(w.detach(), SCHEMES[4], None))
    try:
        fake_quantize(w, a, SCHEMES[4], torch.bfloat16).float().sum().backward()
    finally:
        torch._dynamo.reset()  # later tests compile the real kernels again
    assert len(seen) == 2  # forward, backward
    for inputs in seen:
        assert not [x for x in inputs if x[1] == torch.float64], inputs
    assert seen[0] == [((16, 1), torch.float32), ((16, 32), torch.float32)]  # α, W


@pytest.mark.parametrize("bits", sorted(SCHEMES))
def test_kernels_trace_for_tensors_off_the_cpu(bits):
    """The kernels trace as one graph for another device's tensors too (meta tensors stand in for a GPU's
    here). The SEQ schemes' eager path adds 0-d CPU constants, which an untraced op takes with any
    device's tensor but which Dynamo refused with the tensors of a GPU (it fell back to eager there)."""
    import torch._dynamo

    graphs = []

    def run_traced(gm, example_inputs, _):
        graphs.append(gm)
        return gm.forward

    scheme = SCHEMES[bits]
    w, a = torch.empty(40, 24, device="meta"), torch.empty(40, 1, device="meta")
    g, s_g = torch.empty(40, 24, device="meta", dtype=torch.bfloat16), torch.empty((), device="meta")
    torch._dynamo.reset()
    try:
        w_hat = Kernel(compiled._forward, run_traced)(w, a, scheme, torch.bfloat16)
        gw, ga = Kernel(compiled._backward, run_traced)(w, a, scheme, g, s_g)
    finally:
        torch._dynamo.reset()  # later tests compile the real kernels again
    assert len(graphs) == 2  # one whole graph each: no break
    assert (w_hat.device.type, w_hat.dtype, w_hat.shape) == ("meta", torch.bfloat16, (40, 24))
    assert (gw.shape, ga.shape, gw.dtype, ga.dtype) == ((40, 24), (40, 1), torch.float32, torch.float32)
