"""paretoq: quantization-aware training of LLMs at 1, 1.58, 2, 3 and 4 bits (ParetoQ quantizers).

Importing the package registers the MiniCPM model classes and the ``quant_method: "paretoq"``
loader with transformers (``paretoq.registration``: each as soon as transformers' registry for it
is loaded); it has no other side effects. The public names below are imported when first used, so
``import paretoq`` (and the ``paretoq`` command's start) imports neither torch nor transformers.
"""

import importlib

from paretoq import registration as _registration

__version__ = "0.1.0"

_API = {
    "QuantConfig": "paretoq.quant.config",
    "QuantLinear": "paretoq.quant.linear",
    "quantize_model": "paretoq.quant.swap",
    "dequantize_model": "paretoq.quant.swap",
    "set_kernels": "paretoq.quant.fused",
    "save_packed": "paretoq.export.packed",
    "load_packed": "paretoq.export.packed",
}
__all__ = [*_API, "__version__"]

_registration.register_with_transformers()


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'paretoq' has no attribute {name!r}")
