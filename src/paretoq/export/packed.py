"""Saving and loading packed model folders (:class:`paretoq.quant.packed.PackedLinear` layers).

The folder layout is written down in ``docs/formats.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from paretoq.errors import ModelFolderError, UserError
from paretoq.export.folder import export_config, export_state, tokenizer_files, write_folder
from paretoq.loading import inspect_folder, load_model
from paretoq.quant.embedding import PackedEmbedding, PackedTiedHead, QuantEmbedding, QuantHead, QuantTiedHead
from paretoq.quant.linear import QuantLinear
from paretoq.quant.packed import (PackedLinear, code_format, packed_quantization_config, quant_config_of,
                                  resolve_dtype)
from paretoq.quant.functional import SCHEMES

logger = logging.getLogger(__name__)


def save_packed(model_or_folder: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                scale_dtype=torch.float16, ternary_format: str = "2bit", dtype=torch.bfloat16,
                tokenizer=None) -> Path:
    """Write a packed model folder; the model (or folder) given is not modified.

    ``model_or_folder``: a model with ``QuantLinear`` (fake-quant) or ``PackedLinear`` layers, or
    the folder of one. Quantized layers become ``qweight`` + ``scales`` (``scale_dtype``) + bias;
    every other tensor (norms, and the embeddings and LM head unless ``embed_bits`` / ``head_bits``
    quantize them: then ``qweight`` + ``scales`` as well) is written in ``dtype``. Tokenizer files are
    copied from a source folder (or ``tokenizer.save_pretrained`` is called when one is given).
    """
    scale_dtype = resolve_dtype(scale_dtype)
    dtype = resolve_dtype(dtype, "dtype")
    code_format(SCHEMES[2], ternary_format)  # validates ternary_format
    source = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        source = Path(model_or_folder)
        if inspect_folder(source).format == "plain":
            raise UserError(f"{source} holds an unquantized model (config.json has no quantization_config): "
                            "train it with paretoq train --w_bits ... first, then export the result")
        model = load_model(source)
    else:
        model = model_or_folder
    qc = quant_config_of(model)

    def pack_quant(_name, m: QuantLinear):
        p = PackedLinear.from_quant_linear(m, scale_dtype, ternary_format, bias_dtype=dtype)
        return {k: v for k, v in p.state_dict().items() if v is not None}

    def pack_packed(_name, m: PackedLinear):
        p = m.repacked(scale_dtype, ternary_format, bias_dtype=dtype)
        return {k: v for k, v in p.state_dict().items() if v is not None}

    def pack_embedding(_name, m: QuantEmbedding):
        return PackedEmbedding.from_quant_embedding(m, scale_dtype).state_dict()

    def repack_embedding(_name, m: PackedEmbedding):
        return m.repacked(scale_dtype).state_dict()

    def tied_head(_name, _m):
        return {}  # the tied head reads the embedding's codes and scales: nothing of its own to write

    convert = {QuantLinear: pack_quant, QuantHead: pack_quant, PackedLinear: pack_packed,
               QuantEmbedding: pack_embedding, PackedEmbedding: repack_embedding,
               QuantTiedHead: tied_head, PackedTiedHead: tied_head}
    with torch.no_grad():
        tensors = export_state(model, convert, dtype)
    config = export_config(model, dtype, packed_quantization_config(qc, scale_dtype, ternary_format))
    out = write_folder(out_dir, tensors, config, tokenizer_files(source), model=model, tokenizer=tokenizer)
    logger.info("wrote packed %s-bit model to %s", qc.w_bits, out)
    return out


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a packed folder written by :func:`save_packed` (buffers checked against the config)."""
    model = load_model(path, dtype=dtype, device=device)
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ModelFolderError(f"{Path(path) / 'config.json'}: not a packed model "
                               "(quantization_config.format is not 'packed'): use paretoq export --format packed")
    return model
