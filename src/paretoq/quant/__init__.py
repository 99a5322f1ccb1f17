"""ParetoQ weight quantization: schemes, config, the quantized Linear and the model swap."""

from paretoq.quant.config import QuantConfig, QuantConfigError, parse_bits
from paretoq.quant.functional import SCHEMES, Scheme, fake_quantize
from paretoq.quant.linear import QuantLinear
from paretoq.quant.swap import QuantReport, dequantize_model, quantize_model

__all__ = ["QuantConfig", "QuantConfigError", "parse_bits", "SCHEMES", "Scheme", "fake_quantize",
           "QuantLinear", "QuantReport", "quantize_model", "dequantize_model"]
