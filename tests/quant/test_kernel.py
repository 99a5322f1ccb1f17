"""``Kernel``: compiled by torch.compile, later calls skip Dynamo's machinery but not its guards."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from paretoq.quant.kernel import Kernel

LIMIT = 0.75


def scaled(x: torch.Tensor, s: torch.Tensor):
    y = (x * s).clamp(-LIMIT, LIMIT)
    return y, y.sum(dim=-1, keepdim=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # Dynamo's cache is per function: start (and leave) it empty
    yield
    torch._dynamo.reset()


def _counting(kernel: Kernel) -> list:
    """The shapes of the calls that went through Dynamo."""
    calls = []
    through = kernel._call_dynamo

    def call(args, f_locals):
        calls.append(tuple(args[0].shape))
        return through(args, f_locals)

    kernel._call_dynamo = call
    return calls


def _check(kernel, x, s):
    y, total = kernel(x, s)
    y_ref, total_ref = scaled(x, s)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2  # the same sums in another order
    torch.testing.assert_close(total, total_ref, rtol=tol, atol=tol * y.shape[-1])


def _inputs(rows, cols, dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    return torch.randn(rows, cols, generator=gen).to(dtype), torch.rand(rows, 1, generator=gen).to(dtype) * 2


def test_calls_after_the_first_skip_dynamo():
    kernel = Kernel(scaled)
    dynamo = _counting(kernel)
    for shape in ((32, 32), (48, 64), (7, 200), (200, 7), (33, 33)):
        _check(kernel, *_inputs(*shape))
    assert dynamo == [(32, 32)]


def test_calls_the_guards_refuse_go_through_dynamo():
    kernel = Kernel(scaled)
    dynamo = _counting(kernel)
    _check(kernel, *_inputs(16, 24))
    _check(kernel, *_inputs(16, 24, torch.bfloat16))  # another dtype: a compilation of its own
    _check(kernel, *_inputs(40, 8, torch.bfloat16))
    _check(kernel, *_inputs(1, 24))  # Dynamo specialises sizes 0 and 1
    with torch.inference_mode():
        _check(kernel, *_inputs(16, 24))
    x, s = _inputs(12, 24)
    _check(kernel, x[:, ::2], s)  # strided
    assert dynamo == [(16, 24), (16, 24), (1, 24), (16, 24), (12, 12)]
    _check(kernel, *_inputs(9, 24, torch.bfloat16))  # each kept compilation answers its own calls
    with torch.inference_mode():
        _check(kernel, *_inputs(20, 5))
    assert len(dynamo) == 5


def test_a_dispatch_mode_sees_the_operations():
    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    kernel = Kernel(scaled)
    _check(kernel, *_inputs(16, 24))
    with Recorder() as recorder:
        _check(kernel, *_inputs(16, 24))
    assert "aten.clamp.default" in recorder.ops and "aten.sum.dim_IntList" in recorder.ops


def test_a_backend_without_an_inductor_graph_stays_on_dynamo():
    kernel = Kernel(scaled, lambda gm, example_inputs, graphs: gm.forward)
    dynamo = _counting(kernel)
    for shape in ((16, 24), (24, 16), (16, 24)):
        _check(kernel, *_inputs(*shape))
    assert dynamo == [(16, 24), (24, 16), (16, 24)]


def test_inside_a_compiled_caller_the_math_is_traced_into_its_graph():
    kernel = Kernel(scaled)
    dynamo = _counting(kernel)

    @torch.compile(fullgraph=True, dynamic=True)
    def caller(x, s):
        y, total = kernel(x, s)
        return y * 2, total

    x, s = _inputs(16, 24)
    y, total = caller(x, s)
    y_ref, total_ref = scaled(x, s)
    assert torch.equal(y, y_ref * 2)
    torch.testing.assert_close(total, total_ref)
    assert dynamo == []
