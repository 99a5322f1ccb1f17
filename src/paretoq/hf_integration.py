"""transformers integration: ``from_pretrained`` rebuilds paretoq models from their config.json.

A folder saved by paretoq carries ``config.json["quantization_config"] = {"quant_method":
"paretoq", "w_bits": ..., "group_size": ..., "format": "fake" | "packed", "version": ...}``.
After ``import paretoq`` transformers finds the quantizer below by that ``quant_method``; before
the weights are loaded it swaps the model's Linear layers for ``QuantLinear`` (format "fake": latent
weights + ``weight_clip_val``) or ``PackedLinear`` (format "packed": integer codes + scales), so the
checkpoint's tensors land in the right modules and the saved scales are kept as they are.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from paretoq.quant.config import FORMAT_VERSION, QUANT_METHOD, QuantConfig, QuantConfigError

FORMATS = ("fake", "packed")


class ParetoQHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` entry, as transformers sees it (a thin shell over QuantConfig)."""

    def __init__(self, w_bits=16, group_size=None, format="fake", version=FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.w_bits = w_bits
        self.group_size = group_size
        self.format = format
        self.version = version
        self.extra = {k: v for k, v in kwargs.items() if k != "quant_method"}
        if format not in FORMATS:
            raise QuantConfigError(f"quantization_config.format {format!r} is unknown: expected one of {', '.join(FORMATS)}")
        self.quant_config = QuantConfig.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "w_bits": self.w_bits, "group_size": self.group_size,
                **self.extra, "format": self.format, "version": self.version}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class ParetoQHfQuantizer(HfQuantizer):
    """Rebuilds QuantLinear / PackedLinear modules before transformers loads the weights."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg: ParetoQHfConfig = self.quantization_config
        if cfg.format == "packed":
            from paretoq.quant.packed import replace_with_packed

            replace_with_packed(model, cfg.quant_config)
        else:
            from paretoq.quant.swap import quantize_model

            quantize_model(model, cfg.quant_config, init_scales=False)
        model.config.quantization_config = cfg.to_dict()

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return self.quantization_config.format == "fake"

    @property
    def is_qat_trainable(self) -> bool:
        return self.is_trainable

    def _dequantize(self, model, dtype=None):
        from paretoq.quant.swap import dequantize_model

        return dequantize_model(model)


def register() -> None:
    """Make transformers aware of ``quant_method: "paretoq"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ParetoQHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ParetoQHfQuantizer)
