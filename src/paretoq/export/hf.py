"""Plain Hugging Face export: the fake-quant weights Ŵ baked into ordinary ``nn.Linear`` weights.

The folder has no ``weight_clip_val`` and no ``quantization_config``, so plain transformers, vLLM
and every Llama tool load it as an ordinary model whose logits are the fake-quant model's (exactly
in fp32; bf16 by default, which rounds Ŵ to bf16). A MiniCPM model is written as the equivalent
``LlamaForCausalLM`` (its μP scalings folded into the weights, LongRoPE as transformers'
``longrope``: ``paretoq.models.minicpm.as_llama``), so no paretoq code is needed to load it. It is
as large as a bf16 model: use the packed export for the small files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from paretoq.models.minicpm import MiniCPMConfig, as_llama
from paretoq.export.folder import export_config, export_state, tokenizer_files, write_folder
from paretoq.quant.embedding import PackedEmbedding, PackedTiedHead, QuantEmbedding, QuantHead, QuantTiedHead
from paretoq.quant.packed import PackedLinear, resolve_dtype
from paretoq.quant.linear import QuantLinear

logger = logging.getLogger(__name__)


def export_hf(model_or_folder: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, dtype=torch.bfloat16,
              tokenizer=None) -> Path:
    """Write a plain transformers folder with dequantized weights; the model given is not modified.

    ``model_or_folder``: a fake-quant (``QuantLinear``), packed (``PackedLinear``) or plain model,
    or the folder of one (its tokenizer files are copied). All tensors are written in ``dtype``.
    """
    dtype = resolve_dtype(dtype, "dtype")
    source = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        from paretoq.loading import load_model
        from paretoq.quant.swap import dequantize_model

        source = Path(model_or_folder)
        # A model loaded here is ours to change: bake Ŵ in with dequantize_model.
        model = dequantize_model(load_model(source))
    else:
        model = model_or_folder

    def baked(_name, m):  # Ŵ of a layer still quantized (a model passed in by the caller)
        w = m.dequantized_weight() if isinstance(m, PackedLinear) else m.quantized_weight()
        out = {"weight": w.float()}
        if m.bias is not None:
            out["bias"] = m.bias.float()
        return out

    def baked_table(_name, m):  # a quantized embedding (embed_bits): its Ŵ as the plain table
        return {"weight": (m.dequantized_weight() if isinstance(m, PackedEmbedding) else m.quantized_weight()).float()}

    def tied(_name, _m):  # a tied head: transformers re-ties lm_head.weight to the table from the config
        return {}

    convert = {QuantLinear: baked, QuantHead: baked, PackedLinear: baked, QuantEmbedding: baked_table,
               PackedEmbedding: baked_table, QuantTiedHead: tied, PackedTiedHead: tied}
    with torch.no_grad():  # fp32 first: MiniCPM's scalings fold into fp32 values, rounded once to dtype
        tensors = export_state(model, convert, torch.float32)
        config = export_config(model, dtype, None)
        if isinstance(config, MiniCPMConfig):
            config, tensors = as_llama(config, tensors)
            config.dtype, config.architectures = dtype, ["LlamaForCausalLM"]
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    out = write_folder(out_dir, tensors, config, tokenizer_files(source), model=model, tokenizer=tokenizer)
    logger.info("wrote dequantized %s model to %s", str(dtype).removeprefix("torch."), out)
    return out
