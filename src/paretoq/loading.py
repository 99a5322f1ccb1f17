"""Loading a model folder (plain, fake-quant or packed) for every command, with one-line errors.

``load_model(path)`` checks the folder before transformers sees it — the folder exists, has a
readable config.json with a known model_type, a safetensors weights file whose header parses and
whose tensors have the shapes the config implies — and raises ``ModelFolderError`` naming the
file (and the tensor) otherwise. Pickle weights (``*.bin``) are refused: they can run code when
read. ``trust_remote_code`` is never set unless the caller asks for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paretoq.errors import ModelFolderError, UserError

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "BOOL": torch.bool}


@dataclass
class TensorEntry:
    file: Path
    dtype: str  # safetensors dtype tag ("U8", "F16", ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        torch_dtype = _ST_DTYPES.get(self.dtype)
        return n * (torch_dtype.itemsize if torch_dtype is not None else 1)


@dataclass
class ModelFolder:
    """What ``inspect_folder`` found: the config (dict), the weight files and their tensors."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self.config.get("quantization_config")

    @property
    def format(self) -> str:
        qc = self.quantization_config
        return "plain" if not qc else qc.get("format", "fake")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "HuggingFaceTB/SmolLM2-135M"


def model_dir(path: str | os.PathLike) -> Path:
    """The folder a model argument names: a local folder as it is, or a Hugging Face Hub id (``org/name``)
    resolved to its snapshot in the local Hugging Face cache. Nothing is downloaded: paretoq reads no
    network at run time, so a Hub model must be in the cache first (``hf download org/name``)."""
    folder = Path(path)
    if folder.exists() or not HUB_ID.match(str(path)):
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise ModelFolderError(f"{path} is not a folder, and the Hugging Face cache has no model {path}: download "
                               f"it first (hf download {path}) or give the model's folder") from None


def read_config(path: str | os.PathLike, trust_remote_code: bool = False) -> dict[str, Any]:
    """config.json of a model folder (or cached Hub id) as a dict, after checking the folder."""
    folder = model_dir(path)
    if not folder.exists():
        raise ModelFolderError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a folder: give the model folder (with config.json and "
                               "model.safetensors)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelFolderError(f"{cfg_file} is missing: {folder} is not a model folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{cfg_file} must hold a JSON object, found {type(config).__name__}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise ModelFolderError(f"{cfg_file} has no model_type")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in config):
        raise ModelFolderError(f"{cfg_file}: model_type {model_type!r} is unknown to transformers and paretoq")
    return config


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / SAFETENSORS_NAME, folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{index} is not a valid safetensors index: {e}") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFolderError(f"{index} lists {missing[0]}, which is missing from {folder}")
        return [folder / n for n in names]
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFolderError(f"{folder / pickles[0]}: pickle weight files are not read (they can run code); "
                               "convert the model to safetensors (save_pretrained(..., safe_serialization=True))")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise ModelFolderError(f"{folder} has {others[0]} but no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX}")
    raise ModelFolderError(f"{folder} has no weights file ({SAFETENSORS_NAME})")


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Names, dtypes and shapes of a safetensors file (header only; a truncated file is an error)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = TensorEntry(file, sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except SafetensorError as e:
        raise ModelFolderError(f"{file} is truncated or corrupt: {e}") from None
    except OSError as e:
        raise ModelFolderError(f"{file} cannot be read: {e}") from None


def inspect_folder(path: str | os.PathLike, trust_remote_code: bool = False) -> ModelFolder:
    """Check a model folder and read its config and tensor headers (no weights are loaded)."""
    folder = model_dir(path)
    config = read_config(folder, trust_remote_code)
    files = _weight_files(folder)
    info = ModelFolder(folder, config, files)
    for f in files:
        info.tensors.update(read_safetensors_header(f))
    qc = info.quantization_config
    if qc is not None:
        if not isinstance(qc, dict):
            raise ModelFolderError(f"{folder / 'config.json'}: quantization_config must be a JSON object")
        if qc.get("quant_method") == "paretoq":
            from paretoq.quant.config import QuantConfig

            try:
                QuantConfig.from_dict(qc)
                if info.format == "packed":
                    from paretoq.quant.packed import packed_settings

                    packed_settings(qc)
                elif info.format != "fake":
                    raise UserError(f"quantization_config.format {info.format!r} is unknown: expected fake or packed")
            except UserError as e:
                raise ModelFolderError(f"{folder / 'config.json'}: {e}") from None
    return info


def skeleton(info: ModelFolder, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model the folder describes, on the meta device, with its paretoq layers in place."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(info.path, local_files_only=True, trust_remote_code=trust_remote_code)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # A meta-device skeleton is never partitioned: keep DeepSpeed ZeRO-3's zero.Init out of it.
    from transformers.modeling_utils import set_zero3_state

    with torch.device("meta"), set_zero3_state():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    qc = info.quantization_config
    if qc and qc.get("quant_method") == "paretoq":
        from paretoq.quant.config import QuantConfig

        if info.format == "packed":
            from paretoq.quant.packed import replace_with_packed

            replace_with_packed(model, qc)
        else:
            from paretoq.quant.swap import quantize_model

            quantize_model(model, QuantConfig.from_dict(qc), init_scales=False)
    return model


def check_tensors(info: ModelFolder, model) -> None:
    """Every tensor the model expects is in the files, with the right shape (integer ones: dtype)."""
    groups: dict[int, list[str]] = {}
    expected = model.state_dict(keep_vars=True)
    for key, t in expected.items():
        groups.setdefault(id(t), []).append(key)
    where = info.weight_files[0] if len(info.weight_files) == 1 else info.path / SAFETENSORS_INDEX
    for keys in groups.values():
        present = [k for k in keys if k in info.tensors]
        if not present:
            raise ModelFolderError(f"{where}: tensor {keys[0]} is missing (the config expects it)")
        want = expected[keys[0]]
        for k in present:
            entry = info.tensors[k]
            if entry.shape != tuple(want.shape):
                raise ModelFolderError(f"{entry.file}: tensor {k} has shape {list(entry.shape)}, "
                                       f"but the config implies {list(want.shape)}")
            if not want.is_floating_point() and _ST_DTYPES.get(entry.dtype) != want.dtype:
                raise ModelFolderError(f"{entry.file}: tensor {k} has dtype {entry.dtype}, expected "
                                       f"{str(want.dtype).removeprefix('torch.')}")
    unexpected = sorted(set(info.tensors) - set(expected))
    if unexpected:
        logger.warning("%s: %d tensors are not used by the model (e.g. %s)", info.path, len(unexpected), unexpected[0])


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, **kwargs):
    """Load a causal LM folder (plain, fake-quant or packed) after checking it; returns it in eval mode.

    ``dtype`` None keeps the dtype recorded in config.json. Extra keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    info = inspect_folder(path, trust_remote_code)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
    check_tensors(info, skeleton(info, None if dtype in (None, "auto") else dtype, trust_remote_code))
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            info.path, dtype="auto" if dtype is None else dtype, trust_remote_code=trust_remote_code,
            local_files_only=True, output_loading_info=True, **kwargs)
    except SafetensorError as e:
        raise ModelFolderError(f"{info.weight_files[0]} is truncated or corrupt: {e}") from None
    missing = sorted(loading.get("missing_keys", []) if isinstance(loading, dict) else [])
    if missing:
        raise ModelFolderError(f"{info.weight_files[0]}: tensor {missing[0]} was not loaded")
    left = next((n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta), None)
    if left is not None:
        raise ModelFolderError(f"{info.weight_files[0]}: tensor {left} was not loaded")
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved in a model folder."""
    from transformers import AutoTokenizer

    folder = model_dir(path)
    read_config(folder, trust_remote_code)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                               "vocab.json")):
        raise ModelFolderError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{folder}: the tokenizer cannot be loaded: {' '.join(str(e).split())}") from None


QUANT_WEIGHT_NAMES = ("qweight", "weight")
SCALE_NAMES = ("scales", "weight_clip_val")


def folder_info(path: str | Path) -> dict[str, Any]:
    """The figures of ``paretoq info`` for a model folder, as a dict: parameters, bits, bytes on disk
    and in memory, quantized layers. From config.json and the safetensors headers, with the model
    built on the meta device: no weights are read, so it is instant for any model size."""
    from paretoq.quant.embedding import PackedEmbedding, QuantEmbedding
    from paretoq.quant.linear import QuantLinear
    from paretoq.quant.packed import PackedLinear, packed_settings

    info = inspect_folder(path)
    model = skeleton(info)
    check_tensors(info, model)  # a missing or misshapen tensor is reported, not counted
    qc = info.quantization_config or {}
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (QuantLinear, PackedLinear, QuantEmbedding, PackedEmbedding))}

    disk = {"quantized_weights": 0, "scales": 0, "other": 0}
    for key, entry in info.tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in QUANT_WEIGHT_NAMES:
            disk["quantized_weights"] += entry.nbytes
        elif owner in layers and leaf in SCALE_NAMES:
            disk["scales"] += entry.nbytes
        else:
            disk["other"] += entry.nbytes
    disk["tensors_total"] = sum(disk.values())
    disk["files_total"] = sum(f.stat().st_size for f in info.weight_files)

    seen, memory = set(), {"quantized_weights": 0, "scales": 0, "other": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        owner, _, leaf = name.rpartition(".")
        cls = ("quantized_weights" if owner in layers and leaf in QUANT_WEIGHT_NAMES else
               "scales" if owner in layers and leaf in SCALE_NAMES else "other")
        memory[cls] += t.numel() * t.element_size()
    memory["total"] = sum(memory.values())

    quantized = sum(m.in_features * m.out_features for m in layers.values())
    scale_elems = sum(m.weight_clip_val.numel() if isinstance(m, (QuantLinear, QuantEmbedding)) else m.scales.numel()
                      for m in layers.values())
    total = quantized  # logical weights: each quantized weight counts once, whatever its storage
    for name, t in model.named_parameters():  # tied parameters are listed once
        owner, _, leaf = name.rpartition(".")
        if not (owner in layers and leaf in QUANT_WEIGHT_NAMES + SCALE_NAMES):
            total += t.numel()
    total += sum(m.bias.numel() for m in layers.values() if isinstance(m, PackedLinear) and m.bias is not None)

    fmt = info.format
    # per layer: its bits and scale layout (mixed-precision models differ from layer to layer), and
    # what a packed export stores for it: codes in their packing format + one fp16 scale per row/group
    from paretoq.quant.packed import code_format
    from paretoq.quant.packing import CODE_FORMATS

    ternary = packed_settings(qc)[1] if fmt == "packed" else "2bit"
    layer_bits, packed_bytes = {}, 0
    for name, m in layers.items():
        bits = m.scheme.bits  # the layer's own scheme: per-layer overrides, embed_bits / head_bits
        scales = m.weight_clip_val if hasattr(m, "weight_clip_val") else m.scales
        numel = m.in_features * m.out_features
        layer_bits[name] = {"w_bits": bits, "group_size": m.group_size, "weights": numel}
        packed_bytes += CODE_FORMATS[code_format(m.scheme, ternary)].nbytes(numel) + 2 * scales.numel()
    out: dict[str, Any] = {
        "path": str(info.path),
        "model_type": info.config.get("model_type"),
        "format": fmt,
        "w_bits": qc.get("w_bits", 16) if qc else 16,
        "group_size": qc.get("group_size") if qc else None,
        "parameters": total,
        "quantized_parameters": quantized,
        "quantized_fraction": quantized / total if total else 0.0,
        "num_quantized_layers": len(layers),
        "disk_bytes": disk,
        "memory_bytes": memory,
        "bits_per_quantized_weight": (8 * (disk["quantized_weights"] + disk["scales"]) / quantized) if quantized else None,
        "code_bits_per_quantized_weight": (8 * disk["quantized_weights"] / quantized) if quantized else None,
        "scale_elements": scale_elems,
        "quantized_layers": list(layers),
        "mixed": len({(v["w_bits"], v["group_size"]) for v in layer_bits.values()}) > 1,
        "layer_bits": layer_bits,
        # Σ w_bits · weights / Σ weights over the quantized layers (1.58 counts as 1.58; no scales)
        "mean_w_bits": (sum(v["w_bits"] * v["weights"] for v in layer_bits.values()) / quantized) if quantized else None,
        # what a packed export stores per quantized weight: codes (ternary as ``ternary_format``) + fp16 scales
        "packed_bits_per_weight": (8 * packed_bytes / quantized) if quantized else None,
    }
    if fmt == "packed":
        scale_dtype, ternary = packed_settings(qc)
        out["scale_dtype"] = str(scale_dtype).removeprefix("torch.")
        out["ternary_format"] = ternary
        out["kernel_cache_bytes"] = sum(m.kernel_bytes() for m in layers.values() if isinstance(m, PackedLinear))
    for key, off in (("embed_bits", 16), ("embed_group_size", None), ("head_bits", 16), ("head_group_size", None),
                     ("a_bits", 16), ("a_group_size", None)):
        out[key] = qc.get(key, off) if qc else off
    out["tied_embeddings"] = bool(info.config.get("tie_word_embeddings", False))
    return out
