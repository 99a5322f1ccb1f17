"""``paretoq info DIR``: parameters, bits, bytes (on disk, in memory) and quantized layers of a folder.

Computed from config.json and the safetensors headers, with the model built on the meta device:
no weights are read, so it is instant for any model size. ``folder_info(path)`` returns the same
figures as a dict (what ``--json`` prints), for scripts such as the sweep.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from paretoq.commands._parser import ArgumentParser

QUANT_WEIGHT_NAMES = ("qweight", "weight")
SCALE_NAMES = ("scales", "weight_clip_val")


def folder_info(path: str | Path) -> dict[str, Any]:
    """The figures of ``paretoq info`` for a model folder (see the module docstring)."""
    from paretoq.export.packed import PackedLinear, packed_settings
    from paretoq.loading import check_tensors, inspect_folder, skeleton
    from paretoq.quant.linear import QuantLinear

    info = inspect_folder(path)
    model = skeleton(info)
    check_tensors(info, model)  # a missing or misshapen tensor is reported, not counted
    qc = info.quantization_config or {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, PackedLinear))}

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
    scale_elems = sum(m.weight_clip_val.numel() if isinstance(m, QuantLinear) else m.scales.numel()
                      for m in layers.values())
    total = quantized  # logical weights: each quantized weight counts once, whatever its storage
    for name, t in model.named_parameters():  # tied parameters are listed once
        owner, _, leaf = name.rpartition(".")
        if not (owner in layers and leaf in QUANT_WEIGHT_NAMES + SCALE_NAMES):
            total += t.numel()
    total += sum(m.bias.numel() for m in layers.values() if isinstance(m, PackedLinear) and m.bias is not None)

    fmt = info.format
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
    }
    if fmt == "packed":
        scale_dtype, ternary = packed_settings(qc)
        out["scale_dtype"] = str(scale_dtype).removeprefix("torch.")
        out["ternary_format"] = ternary
        out["kernel_cache_bytes"] = sum(m.kernel_bytes() for m in layers.values())
    return out


def compact_names(names: list[str]) -> list[str]:
    """model.layers.0.mlp.up_proj, model.layers.1.mlp.up_proj → model.layers.{0-1}.mlp.up_proj."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key, idx = (n[:m.start(1)] + "{}" + n[m.end(1):], int(m.group(1))) if m else (n, -1)
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(idx)
    out = []
    for key in order:
        idx = sorted(groups[key])
        if idx == [-1]:
            out.append(key)
        elif idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1:
            out.append(key.replace("{}", f"{{{idx[0]}-{idx[-1]}}}"))
        else:
            out.append(key.replace("{}", "{" + ",".join(map(str, idx)) + "}"))
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def format_info(d: dict[str, Any]) -> str:
    lines = [f"model        {d['path']}", f"model_type   {d['model_type']}"]
    if d["format"] == "plain":
        lines.append("format       plain (not quantized)")
    else:
        group = "per row" if d["group_size"] is None else f"per group of {d['group_size']}"
        extra = ""
        if d["format"] == "packed":
            extra = f" in {d['scale_dtype']}" + (f", ternary codes {d['ternary_format']}" if d["w_bits"] == 1.58 else "")
        lines.append(f"format       {d['format']}: w_bits {d['w_bits']}, scales {group}{extra}")
    lines.append(f"parameters   {d['parameters']:,} ({d['quantized_parameters']:,} quantized, "
                 f"{d['quantized_fraction']:.1%}, in {d['num_quantized_layers']} layers)")
    disk, mem = d["disk_bytes"], d["memory_bytes"]
    lines.append(f"on disk      {_mib(disk['files_total'])}: quantized weights {_mib(disk['quantized_weights'])}, "
                 f"scales {_mib(disk['scales'])}, other {_mib(disk['other'])}")
    mem_line = (f"in memory    {_mib(mem['total'])}: quantized weights {_mib(mem['quantized_weights'])}, "
                f"scales {_mib(mem['scales'])}, other {_mib(mem['other'])}")
    if d.get("kernel_cache_bytes"):
        mem_line += f" (+ {_mib(d['kernel_cache_bytes'])} int4 kernel cache when run in bf16 on CPU)"
    lines.append(mem_line)
    if d["bits_per_quantized_weight"] is not None:
        lines.append(f"bits/weight  {d['bits_per_quantized_weight']:.3f} per quantized weight on disk "
                     f"(codes {d['code_bits_per_quantized_weight']:.3f} + scales)")
        lines.append("quantized layers:")
        lines += [f"  {n}" for n in compact_names(d["quantized_layers"])]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="paretoq info", description="Parameters, bits, bytes and quantized layers of a model "
                       "folder (reads config.json and tensor headers only).")
    p.add_argument("model", help="model folder")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    d = folder_info(args.model)
    print(json.dumps(d, indent=2) if args.json else format_info(d), file=sys.stdout)
    return 0
