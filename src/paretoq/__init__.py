"""paretoq: quantization-aware training of LLMs at 1, 1.58, 2, 3 and 4 bits (ParetoQ quantizers).

Importing the package registers the MiniCPM model classes and the ``quant_method: "paretoq"``
loader with transformers; it has no other side effects.
"""

from paretoq import hf_integration as _hf_integration
from paretoq.quant import QuantConfig, QuantLinear, dequantize_model, quantize_model

_hf_integration.register()

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantLinear", "quantize_model", "dequantize_model", "__version__"]
