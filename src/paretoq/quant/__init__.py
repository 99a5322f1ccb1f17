"""ParetoQ weight quantization: schemes, config, the quantized Linear, the model swap and the fused kernels."""

from paretoq.quant.config import QuantConfig, QuantConfigError, parse_bits
from paretoq.quant.functional import SCHEMES, Scheme, fake_quantize
from paretoq.quant.fused import FusedKernels, set_kernels
from paretoq.quant.linear import QuantLinear
from paretoq.quant.swap import QuantReport, dequantize_model, quantize_model

__all__ = ["QuantConfig", "QuantConfigError", "parse_bits", "SCHEMES", "Scheme", "fake_quantize",
           "QuantLinear", "QuantReport", "quantize_model", "dequantize_model", "set_kernels", "FusedKernels"]
