"""paretoq: quantization-aware training of LLMs at 1, 1.58, 2, 3 and 4 bits (ParetoQ quantizers).

Importing the package registers the MiniCPM model classes and the ``quant_method: "paretoq"``
loader with transformers; it has no other side effects.
"""

import paretoq.models  # registers MiniCPM with transformers' Auto classes
from paretoq import hf_integration as _hf_integration
from paretoq.quant import QuantConfig, QuantLinear, dequantize_model, quantize_model
from paretoq.export.packed import load_packed, save_packed

_hf_integration.register()

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantLinear", "quantize_model", "dequantize_model", "save_packed", "load_packed",
           "__version__"]
