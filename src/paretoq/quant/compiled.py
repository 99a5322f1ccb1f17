"""Fused quantizer kernels: the same math, compiled by Inductor.

The eager quantizer (``functional.py``) makes ~12 elementwise passes over cache-sized blocks of
each weight; a fused kernel makes one: it reads W, α (and g) once and writes Ŵ (forward) or ∂L/∂W
and the row/group sums of ∂L/∂α (backward). Measured on the 56 weights of a 60M Llama (2-bit,
per row, one CPU thread, bf16 Ŵ and g): forward 96 → 41 ms, backward 174 → 50 ms, against 22 and
20 ms for the fp32↔bf16 casts FP training makes in their place (``benchmarks/qat_overhead.py``
has the effect on whole training steps).

The kernels are traced from the scheme objects' own methods, so the math stays in
``functional.py``. Ŵ and ∂L/∂W are bit-identical to the eager path; ∂L/∂α sums the same products
in another order (≤ 2e-7 relative; ``tests/quant/test_compiled.py``). Shapes are dynamic: one
compilation per scheme and compute dtype (a few seconds each, cached on disk by PyTorch). The
weights and scales go in detached: Dynamo specialises on the shape of every ``nn.Parameter`` it
sees, which would compile once per distinct layer shape and, past its recompile limit (8), fall
back to eager without a word.

Per call (each layer, forward and backward, every step) the Python around the kernels costs about
as much as the kernels themselves at small micro-batches, so that path is kept short: the
compiled kernels are called without Dynamo's per-call machinery, under its guards
(``paretoq.quant.kernel``), with no ``no_grad`` re-entry, no views of per-row weights and no float
turned into a tensor per call.

On CPU tensors the kernels are not compiled in the training process at all: ``FORWARD_CPU`` and
``BACKWARD_CPU`` run the same functions built ahead of time by AOTInductor in child processes and
cached on disk (``prebuilt.py``; ~7 µs a call instead of ~25 µs, and neither Inductor's ~40 MiB
of modules nor a compile's transient in the training process). ``prebuild`` builds what a run
needs before its model is loaded. Other devices take the ``torch.compile`` path above.

``enable(True)`` switches every ``fake_quantize`` (and the fake-quant cache's flush) to these
kernels; ``paretoq train`` does it for a run on CPU (``--compile_quantizer auto``, the default)
or when asked (``true``). If compiling fails (no C++ compiler, an unsupported device) paretoq logs
one warning and stays on the eager path.
"""

from __future__ import annotations

import logging

import torch

from paretoq.quant import functional, prebuilt
from paretoq.quant.kernel import Kernel

logger = logging.getLogger(__name__)


def _rows(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W and α as (rows, columns) and (rows, 1), one row per scale: a group of g columns is laid out
    as a row of its own (a view). The kernels then see one 2-D shape for every layout; with the 3-D
    grouped view and dynamic shapes Inductor's kernels ran ~6× slower (measured on a 1408×512 weight).
    Detached: Dynamo would specialise on each ``nn.Parameter``'s shape (one compilation per layer
    shape). Per-row scales need no view (a view costs a few µs, here and in Dynamo's guards)."""
    groups = scale.shape[-1]
    if groups == 1:
        return weight.detach(), scale.detach()
    return weight.detach().reshape(-1, weight.shape[1] // groups), scale.detach().reshape(-1, 1)


def _forward(w: torch.Tensor, a: torch.Tensor, scheme, dtype: torch.dtype) -> torch.Tensor:
    a = functional.effective_scale(a)
    return (scheme.quantize_scaled(w, a) * a).to(dtype)


def _backward(w: torch.Tensor, a: torch.Tensor, scheme, grad: torch.Tensor, s_g: torch.Tensor):
    a = functional.effective_scale(a)
    g = grad.to(torch.float32)
    x = w / a
    c = x.clamp(scheme.lo, scheme.hi)
    mask = (c == x).to(torch.float32)
    coef = scheme.coefficient_(scheme.quantize_(c, w), x, mask)
    return g * mask, (coef * g * s_g).sum(dim=-1, keepdim=True)


# One compiled pair per process, shared by every CompiledQuantizer: Dynamo keys its cache on the
# backend, so kernels made per instance would compile anew each time, and past its recompile limit (8)
# run eager code.
FORWARD = Kernel(_forward)
BACKWARD = Kernel(_backward)

# On CPU the same functions as kernels built ahead of time (``prebuilt.py``): no compiler in the
# training process. The backward's row sum is where Inductor compiles a size regime in: rows longer
# than 4096 values are summed in chunks (its CascadeSumHelper, for accuracy), so a kernel traced on
# short rows refuses long ones and each regime gets its own.
_LONG_ROW = 4096
FORWARD_CPU = prebuilt.Prebuilt(_forward, (("rows", "cols"), ("rows", 1), None, None), other=FORWARD,
                                examples={None: {"rows": 64, "cols": 48}})
BACKWARD_CPU = prebuilt.Prebuilt(_backward, (("rows", "cols"), ("rows", 1), None, ("rows", "cols"), ()),
                                 other=BACKWARD, variant=lambda w, *_: w.shape[1] > _LONG_ROW,
                                 examples={False: {"rows": 64, "cols": 48}, True: {"rows": 8, "cols": _LONG_ROW + 8}})


def forget() -> None:
    """Drop every compilation (Dynamo's and the kernels'): the next call compiles afresh (tests)."""
    torch._dynamo.reset()
    for kernel in (FORWARD, BACKWARD, FORWARD_CPU, BACKWARD_CPU):
        kernel.forget()


class CompiledQuantizer:
    """The compiled forward and backward, with a one-time fallback to eager on failure.

    Called once per layer in forward and in backward, so the Python around the kernels is kept
    short: its callers run it with autograd off (``FakeQuantize``, the no-grad public functions); it
    views only grouped weights.
    """

    def __init__(self):
        self.forward_fn = FORWARD_CPU  # CPU tensors: built ahead; others: FORWARD
        self.backward_fn = BACKWARD_CPU
        self._grad_scales = {}  # (numel, grad_qp, device) → s_g as a tensor (a float would recompile per value)

    def _fallback(self, error: Exception) -> None:
        logger.warning("compiled quantizer unavailable (%s: %s); using the eager quantizer",
                       type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        enable(False)

    def _grad_scale(self, weight: torch.Tensor, scheme) -> torch.Tensor:
        key = (weight.numel(), scheme.grad_qp, weight.device)
        s_g = self._grad_scales.get(key)
        if s_g is None:
            s_g = self._grad_scales[key] = torch.tensor(functional.gradient_scale(key[0], scheme), dtype=torch.float32,
                                                        device=weight.device)
        return s_g

    def forward(self, weight, scale, scheme, dtype):
        w, a = _rows(weight, scale)
        grouped = scale.shape[-1] != 1
        try:
            out = self.forward_fn(w, a, scheme, dtype)
        except Exception as e:  # noqa: BLE001 -- any compile failure: fall back, same numbers
            self._fallback(e)
            return functional.quantize_weight(weight, scale, scheme, dtype)
        return out.view(weight.shape) if grouped else out

    def backward(self, weight, scale, scheme, grad, weight_grad, scale_grad):
        w, a = _rows(weight, scale)
        grouped = scale.shape[-1] != 1
        try:
            g = grad.reshape(w.shape) if grouped else grad.contiguous()
            gw, ga = self.backward_fn(w, a, scheme, g, self._grad_scale(weight, scheme))
        except Exception as e:  # noqa: BLE001
            self._fallback(e)
            return functional.quantize_backward(weight, scale, scheme, grad, weight_grad=weight_grad,
                                                scale_grad=scale_grad)
        return ((gw.view(weight.shape) if grouped else gw) if weight_grad else None,
                (ga.view(scale.shape) if grouped else ga) if scale_grad else None)


def prebuild(schemes, dtype: torch.dtype) -> None:
    """Build (where not on disk) and load the CPU kernels that training ``schemes`` in ``dtype`` calls:
    Ŵ in ``dtype``; ∂L/∂W from a ``dtype`` gradient (each micro-batch) or an fp32 one (the fake-quant
    cache's sum), on short and long rows. ``paretoq train`` calls it before loading the model, so the
    build's child processes (~0.5 GB each, seconds to a minute, once per machine) never share memory
    with training. Falls back to the eager quantizer (one warning) if they cannot be built."""
    f32 = torch.float32
    calls = []
    for scheme in schemes:
        calls.append((FORWARD_CPU, (f32, f32, scheme, dtype)))
        calls += [(BACKWARD_CPU, (f32, f32, scheme, grad, f32, long)) for grad in dict.fromkeys((dtype, f32))
                  for long in (False, True)]
    try:
        prebuilt.prepare(calls)
    except (prebuilt.BuildError, RuntimeError, OSError) as e:
        if enabled():
            functional._FUSED._fallback(e)


def enable(on: bool = True) -> None:
    """Route the quantizer through the fused kernels (``on``) or back to the eager ones."""
    functional._FUSED = CompiledQuantizer() if on else None


def enabled() -> bool:
    return functional._FUSED is not None
