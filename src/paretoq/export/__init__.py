"""Exports of a quantized model: packed paretoq folders (``packed``), dequantized HF folders
(``hf``) and GGUF files (``gguf``). Submodules are imported on use; this package imports nothing."""
