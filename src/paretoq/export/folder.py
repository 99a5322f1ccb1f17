"""Writing a model folder (config.json + model.safetensors + tokenizer files), all or nothing.

Shared by the packed and the HF exports. The files are written into a temporary folder next to
``out_dir`` and moved into place only once all of them are complete, so an interrupted export
never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from paretoq.errors import UserError
from paretoq.files import publish_files, staging_folder

WEIGHTS_NAME = "model.safetensors"
# Files of a model folder that describe how to tokenise and generate, copied along with the weights, and
# the run's paretoq_config.yaml (its training length is the window `paretoq eval` uses by default).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "paretoq_config.yaml")


def export_state(model: nn.Module, convert: dict[type, Callable[[str, nn.Module], dict[str, torch.Tensor]]],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to write for ``model``, without modifying it.

    Modules whose type is a key of ``convert`` contribute the tensors their converter returns
    (names relative to the module); every other parameter and persistent buffer is copied, float
    tensors cast to ``dtype``. Tensors shared by several names (tied embeddings) are written once,
    under their first name, as ``save_pretrained`` does; the loader re-ties them from the config.
    """
    converted: dict[str, torch.Tensor] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        fn = convert.get(type(module))
        if fn is None or any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        skip_prefixes.append(prefix)
        for key, tensor in fn(name, module).items():
            converted[prefix + key] = tensor.detach().contiguous()
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if any(key.startswith(p) for p in skip_prefixes):
            continue
        ident = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                 tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    out.update(converted)
    return {k: v.cpu() for k, v in out.items()}


def export_config(model: nn.Module, dtype: torch.dtype, quantization_config: dict | None):
    """A copy of ``model.config`` with ``dtype`` and ``quantization_config`` set (or removed)."""
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    return config


def tokenizer_files(source_dir: str | os.PathLike | None) -> list[Path]:
    if source_dir is None:
        return []
    source = Path(source_dir)
    return [source / n for n in TOKENIZER_FILES if (source / n).is_file()]


def write_folder(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config,
                 extra_files: Iterable[Path] = (), model: nn.Module | None = None, tokenizer=None) -> Path:
    """Write config.json, model.safetensors and ``extra_files`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder: choose another --output")
    with staging_folder(out.parent, out.name) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        if model is not None and getattr(model, "generation_config", None) is not None \
                and not (tmp / "generation_config.json").exists():
            try:
                model.generation_config.save_pretrained(tmp)
            except ValueError:  # an invalid generation config is not worth failing the export for
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for stale in ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"):
            (out / stale).unlink(missing_ok=True)
        publish_files(tmp, out)  # config.json last
    return out
