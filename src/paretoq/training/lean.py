"""Lean precision mode (``--master_weights bf16``) and the memory a training run holds.

fp32 master (the default): weights, gradients and both AdamW moments in fp32, 16 bytes per
parameter before activations. Lean: the latent weights (and so their gradients) in bf16, the
scales (``weight_clip_val``) in fp32, and AdamW's moments in 8 or 4 bits from torchao's low-bit
optimizers (transformers' ``--optim adamw_torch_8bit`` / ``adamw_torch_4bit``), which apply each
update to a bf16 weight with stochastic rounding (``bf16_stochastic_round``: the fp32 result is
rounded up or down at random in proportion to its distance from both, so an update far below
the bf16 spacing still moves the weight by its expected value). 2 + 2 + 2 × (1 + 4/256) ≈ 6.03
bytes per parameter with 8-bit moments, ≈ 5.06 with 4-bit (``training_state_bytes`` counts them).

Plain bf16 weights updated with round-to-nearest lose every update smaller than half the
spacing of bf16 (a relative 2^-9): at LR 2e-5 most of them. So lean mode only takes an optimizer
that rounds stochastically; the CLI refuses others in one line.
"""

from __future__ import annotations

import logging
import resource
import sys

import torch
from torch import nn

from paretoq.errors import UserError
from paretoq.quant.linear import SCALE_PARAM, set_fake_quant_cache

logger = logging.getLogger(__name__)

MASTER_WEIGHTS = ("fp32", "bf16")
# transformers' names of torchao's low-bit AdamW (both round bf16 weights stochastically when asked)
SR_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit")
LEAN_DEFAULT_OPTIMIZER = "adamw_torch_8bit"
SR_OPTION = "bf16_stochastic_round"


def validate_master_weights(value: str, optim: str, optim_args: str | None, explicit_optim: bool) -> str:
    """The optimizer lean mode trains with (``optim`` itself, or the lean default when none was
    given); a UserError when ``value`` is unknown or the optimizer cannot round stochastically."""
    if value not in MASTER_WEIGHTS:
        raise UserError(f"--master_weights must be fp32 or bf16, got {value!r}")
    if value == "fp32":
        return optim
    if not explicit_optim:
        optim = LEAN_DEFAULT_OPTIMIZER
    if optim not in SR_OPTIMIZERS:
        raise UserError(f"--master_weights bf16 needs an optimizer that applies updates to bf16 weights with "
                        f"stochastic rounding: --optim {' or '.join(SR_OPTIMIZERS)} (got --optim {optim})")
    if f"{SR_OPTION}=false" in (optim_args or "").replace(" ", "").lower():
        raise UserError(f"--master_weights bf16 with --optim_args {SR_OPTION}=False would lose the updates smaller "
                        "than bf16's spacing: drop that option")
    quiet_torchao()
    try:
        import torchao.optim  # noqa: F401  (also registers its optimizer states as safe to torch.load)
    except ImportError:
        raise UserError(f"--optim {optim} needs torchao: pip install 'paretoq[lean]'") from None
    return optim


def with_stochastic_rounding(optim_args: str | None) -> str:
    """``--optim_args`` with ``bf16_stochastic_round=True`` added unless it already names the option."""
    args = optim_args or ""
    if SR_OPTION in args:
        return args
    return f"{args},{SR_OPTION}=True" if args else f"{SR_OPTION}=True"


def import_optimizer_states(optim: str) -> None:
    """Make the optimizer's state classes loadable with ``torch.load(weights_only=True)`` (resume)."""
    if str(getattr(optim, "value", optim)) in SR_OPTIMIZERS:
        quiet_torchao()
        import torchao.optim  # noqa: F401


def quiet_torchao() -> None:
    """torchao logs a warning per GPU extension it cannot load on import (all of them on CPU)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)


@torch.no_grad()
def to_lean(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast every floating-point parameter to ``dtype`` except the scales, which stay fp32 (buffers,
    e.g. rotary frequencies, are kept as they are); turn the fake-quant cache off (it would hold a second copy of each weight for the step).
    Tied parameters stay tied (cast in place of the Parameter's data). Returns how many were cast."""
    cast = 0
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith(SCALE_PARAM) and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += 1
    set_fake_quant_cache(model, False)
    return cast


def is_lean(model: nn.Module) -> bool:
    """Whether the model's latent weights are bf16 (lean mode)."""
    return any(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not n.endswith(SCALE_PARAM))


# --- what a run holds ------------------------------------------------------------------------------


def _nbytes(t) -> int:
    """Bytes of a tensor's storage, tensor subclasses (torchao's low-bit states) by their inner tensors."""
    if not isinstance(t, torch.Tensor):
        return 0
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def training_state_bytes(model: nn.Module, optimizer=None) -> dict[str, int]:
    """Bytes of the trainable weights, their gradients and the optimizer's state, and the parameter
    count; ``per_parameter`` = their sum / parameters (tied parameters counted once)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    out = {"parameters": sum(p.numel() for p in params.values()),
           "weights": sum(_nbytes(p.data) for p in params.values()),
           "gradients": sum(_nbytes(p.grad) for p in params.values() if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optimizer"] += sum(_nbytes(v) for k, v in state.items() if k != "step")
    out["per_parameter"] = (out["weights"] + out["gradients"] + out["optimizer"]) / max(out["parameters"], 1)
    return out


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """The process's peak memory: CUDA ``max_memory_allocated`` on a GPU device, else the resident
    set high-water mark (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
