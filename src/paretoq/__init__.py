"""paretoq: quantization-aware training of LLMs at 1, 1.58, 2, 3 and 4 bits (ParetoQ quantizers).

Importing the package registers the MiniCPM model classes with transformers' Auto* factories;
it has no other side effects.
"""

from paretoq.quant import QuantConfig, QuantLinear, quantize_model, dequantize_model

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantLinear", "quantize_model", "dequantize_model", "__version__"]
