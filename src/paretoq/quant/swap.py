"""Model surgery: swap ``nn.Linear`` modules for ``QuantLinear`` (and back), in place."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from paretoq.quant import scale_init as scale_init_lib
from paretoq.quant.config import QuantConfig, QuantConfigError
from paretoq.quant.functional import group_label
from paretoq.quant.fused import set_kernels
from paretoq.quant.linear import QuantLinear

logger = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What ``quantize_model`` did."""

    w_bits: float
    group_size: int | None
    layers: list[str] = field(default_factory=list)
    quantized_params: int = 0
    total_params: int = 0
    mixed: str | None = None  # QuantConfig.describe() of a config with per-layer overrides

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fraction_quantized(self) -> float:
        return self.quantized_params / max(self.total_params, 1)

    def __str__(self) -> str:
        what = self.mixed or f"{self.w_bits} bits ({group_label(self.group_size)})"
        return (f"quantized {self.num_layers} Linear layers to {what}: "
                f"{self.quantized_params:,} of {self.total_params:,} parameters ({self.fraction_quantized:.1%})")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (e.g. ``model.layers.0.mlp.up_proj``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def selected_linears(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` modules ``config`` selects, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and config.selects(n)]


def quantize_model(model: nn.Module, config: QuantConfig, init_scales: bool = True,
                   calibration_data=None, kernels="eager") -> QuantReport:
    """Swap the selected Linear layers of ``model`` for ``QuantLinear``, in place.

    Every layer is checked before any is swapped, so a bad ``group_size`` leaves the model as it
    was. Scales are initialised from the weights (``init_scales=True``, by ``config.scale_init``)
    or left for a checkpoint to fill. ``calibration_data`` (token ids, (num_blocks, block_len)) is
    needed by ``scale_init="mse_act"`` / ``"gptq"``: the full-precision model runs on it once,
    before the swap, to measure E[x²] (E[x xᵀ] for gptq) of each selected layer's input. The model's ``config.quantization_config``
    records the setting so that ``save_pretrained`` / ``from_pretrained`` (after ``import
    paretoq``) round-trip it.

    ``kernels`` chooses the quantizer the new layers run (``paretoq.quant.set_kernels`` switches
    them, or a model quantized earlier, later): "eager" (default: nothing is compiled), "fused" (fused
    kernels: on CPU built ahead of time in child processes at their first call, once per machine,
    and cached on disk; ``torch.compile`` on other devices) or "auto" (fused for CPU weights, eager
    elsewhere — what ``paretoq train`` uses, ``--compile_quantizer auto``). Same Ŵ and ∂L/∂W bits
    either way, ∂L/∂α to summation order.
    """
    report = QuantReport(w_bits=config.w_bits, group_size=config.group_size,
                         total_params=sum(p.numel() for p in model.parameters()),
                         mixed=config.describe() if config.mixed else None)
    if not config.enabled:
        return report
    set_kernels([], kernels)  # a bad choice fails before the model changes
    targets = selected_linears(model, config)
    for name, linear in targets:
        config.check_layer(name, linear.in_features)
    stats = None
    if init_scales and scale_init_lib.needs_calibration(config.scale_init) and targets:
        if calibration_data is None:
            raise QuantConfigError(
                f"scale_init {config.scale_init!r} needs calibration data: pass calibration_data=<token ids "
                "(blocks, length)> to quantize_model (paretoq train: --calibration_samples N), or use scale_init "
                "'mse' / 'reference'")
        stats = scale_init_lib.calibration_statistics(model, dict(targets), config.scale_init, calibration_data)
    swapped = {}
    for name, linear in targets:
        swapped[name] = QuantLinear.from_linear(linear, config.for_layer(name), name=name, init=init_scales)
        set_module(model, name, swapped[name])
        report.layers.append(name)
        report.quantized_params += linear.weight.numel()
    if init_scales:
        scale_init_lib.initialize_scales(swapped, config.scale_init, stats)
    if not targets:
        logger.warning("quantize_model: no Linear layer matched include=%s exclude=%s", config.include, config.exclude)
    set_kernels(swapped.values(), kernels)
    if hasattr(model, "config"):
        model.config.quantization_config = config.to_dict()
    # INFO for a real quantization; DEBUG when the layers are only rebuilt for loading a checkpoint
    logger.log(logging.INFO if init_scales else logging.DEBUG, "%s", report)
    return report


def dequantize_model(model: nn.Module) -> nn.Module:
    """Bake the fake-quantized weights into plain ``nn.Linear`` layers, in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, module.to_linear())
    if hasattr(model, "config") and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model
