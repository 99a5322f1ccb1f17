"""compressed-tensors export: the integers of every quantized layer in the format vLLM and transformers load.

Each ParetoQ level set is an integer grid, Ŵ = s · k (``paretoq.export.integers``), and compressed-tensors'
symmetric integer quantization stores exactly that: ``weight_packed`` (the signed integers q, packed into int32 by
the package's ``pack_to_int32``), ``weight_scale`` (one per output row — strategy "channel" — or per group —
strategy "group") and ``weight_shape``; its dequantization is q · scale, zero point 0, with q in
[−2^(b−1), 2^(b−1) − 1] for ``num_bits`` b:

==========  ===============  ========  ==========================================
bits        k                scale     smallest exact num_bits (compressed-tensors)
==========  ===============  ========  ==========================================
1           −1, +1 (0)       α̃         2 (int2: −2 … 1)
1.58        −1, 0, +1        2α̃/3      2
2           −3, −1, +1, +3   α̃/4       3 (int3: −4 … 3)
3           −4 … 3           α̃         3
4           −8 … 7           α̃         4
==========  ===============  ========  ==========================================

So q = k and scale = s hold Ŵ exactly, up to the rounding of s to the stored scale dtype. ``num_bits=None``
(default) writes each layer at its smallest exact width; ``num_bits=4`` or ``8`` writes every layer at that
width (the widths vLLM's compressed-tensors W4A16 / W8A16 kernels take; the integers are the same). A layer whose
integers do not fit the width asked for is refused (``UserError``), never rounded. Layers with the same width and
scale layout form one config group; unquantized Linear layers (the LM head) are listed in ``ignore``.

A MiniCPM model is written as the equivalent ``LlamaForCausalLM`` (``paretoq.models.minicpm.as_llama``, as in the
hf export): its residual scaling folds into the scales of o_proj and down_proj, so the integers stay the same.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from paretoq.errors import UserError
from paretoq.export.folder import export_config, export_state, tokenizer_files, write_folder
from paretoq.export.integers import LayerIntegers, layer_integers
from paretoq.models.minicpm import MiniCPMConfig, as_llama
from paretoq.quant.linear import QuantLinear
from paretoq.quant.packed import PackedLinear, resolve_dtype

logger = logging.getLogger(__name__)

NUM_BITS = (2, 3, 4, 8)  # widths written (pack_to_int32 packs 1 … 8; 1 bit has no symmetric ±1 grid)


def smallest_num_bits(grid: tuple[int, ...]) -> int:
    """The smallest b with every integer of ``grid`` in [−2^(b−1), 2^(b−1) − 1] (b ≥ 2)."""
    b = 2
    while min(grid) < -(1 << (b - 1)) or max(grid) > (1 << (b - 1)) - 1:
        b += 1
    return b


def _num_bits_for(name: str, q: LayerIntegers, num_bits: int | None) -> int:
    need = smallest_num_bits(q.grid)
    if num_bits is None:
        return need
    if need > num_bits:
        raise UserError(f"compressed-tensors export: layer {name} ({q.bits}-bit, integers {list(q.grid)}) needs "
                        f"int{need}, more than --ct_num_bits {num_bits}: omit it to write each layer at its exact width")
    return num_bits


def _scheme_dict(num_bits: int, group_size: int | None) -> dict:
    return {"num_bits": num_bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "channel" if group_size is None else "group", "group_size": group_size}


def export_compressed_tensors(model_or_folder: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, *,
                              num_bits: int | None = None, scale_dtype=torch.float16, dtype=torch.bfloat16,
                              tokenizer=None) -> Path:
    """Write a compressed-tensors ("pack-quantized") folder; the model given is not modified.

    Args:
        model_or_folder: a fake-quant (``QuantLinear``) or packed (``PackedLinear``) Llama-family or MiniCPM causal
            LM, or its folder (its tokenizer files are copied).
        out_dir: the output folder (written atomically).
        num_bits: None (default: each layer at its smallest exact width) or one of 2, 3, 4, 8 for every layer
            (4 or 8 for vLLM's kernels); a layer that needs more is refused.
        scale_dtype: dtype of ``weight_scale`` (fp16 default, bf16, fp32).
        dtype: dtype of every unquantized tensor (embeddings, norms, LM head, biases); bf16 default.
    """
    import compressed_tensors
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig

    if num_bits is not None and num_bits not in NUM_BITS:
        raise UserError(f"compressed-tensors num_bits {num_bits} is not supported: use one of "
                        f"{', '.join(map(str, NUM_BITS))} (or omit it)")
    scale_dtype = resolve_dtype(scale_dtype)
    dtype = resolve_dtype(dtype, "dtype")
    source = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        from paretoq.loading import inspect_folder, load_model

        source = Path(model_or_folder)
        if inspect_folder(source).format == "plain":
            raise UserError(f"{source} holds an unquantized model (config.json has no quantization_config): "
                            "compressed-tensors export writes quantized layers; use --format hf for a plain model")
        model = load_model(source, dtype=torch.float32)
    else:
        model = model_or_folder

    layers: dict[str, LayerIntegers] = {}
    groups: dict[tuple[int, int | None], list[str]] = defaultdict(list)

    def convert(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        q = layer_integers(module)
        if q is None:
            raise UserError(f"compressed-tensors export: layer {name} ({type(module).__name__}) has no integer codes")
        bits = _num_bits_for(name, q, num_bits)
        group = None if q.scale.shape[1] == 1 else q.group_size
        layers[name] = q
        groups[(bits, group)].append(name)
        # the scale in the place of the weight, so that as_llama folds MiniCPM's constants into it
        out = {"weight": q.scale.clone()}
        if module.bias is not None:
            out["bias"] = module.bias.detach().double()
        return out

    with torch.no_grad():
        tensors = export_state(model, {QuantLinear: convert, PackedLinear: convert}, torch.float64)
        if not layers:
            raise UserError("compressed-tensors export: the model has no quantized layers (train or quantize it first)")
        config = export_config(model, dtype, None)
        if isinstance(config, MiniCPMConfig):
            config, tensors = as_llama(config, tensors)
            config.architectures = ["LlamaForCausalLM"]
        bits_of = {name: bits for (bits, _), names in groups.items() for name in names}
        for name, q in layers.items():
            scale = tensors.pop(f"{name}.weight")  # (out, groups), constants folded in
            tensors[f"{name}.weight_packed"] = pack_to_int32(q.k.to(torch.int8), bits_of[name])
            tensors[f"{name}.weight_scale"] = scale.to(scale_dtype).contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor(list(q.k.shape), dtype=torch.int64)
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v
                   for k, v in tensors.items()}

    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    single = len(groups) == 1
    config_groups = {f"group_{i}": {"targets": ["Linear"] if single else sorted(names),
                                    "weights": _scheme_dict(bits, group)}
                     for i, ((bits, group), names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0][0]))}
    qc = QuantizationConfig.model_validate({"config_groups": config_groups, "format": "pack-quantized",
                                            "quantization_status": "compressed",
                                            "ignore": sorted(linear_names) if single else []})
    qc_dict = qc.to_dict()
    qc_dict["version"] = compressed_tensors.__version__
    config.quantization_config = qc_dict
    config.dtype = dtype
    out = write_folder(out_dir, tensors, config, tokenizer_files(source), model=model, tokenizer=tokenizer)
    logger.info("wrote compressed-tensors model to %s: %s", out,
                ", ".join(f"{len(n)} layers int{b}{'' if g is None else f' group {g}'}" for (b, g), n in groups.items()))
    return out
