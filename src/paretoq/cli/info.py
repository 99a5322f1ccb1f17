"""``paretoq info DIR``: parameters, bits, bytes (on disk, in memory) and quantized layers of a folder.

The figures come from ``paretoq.loading.folder_info`` (config.json and the safetensors headers, the
model built on the meta device: no weights are read); ``--json`` prints them as they are.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from paretoq.cli.common import add_model_argument, model_argument
from paretoq.errors import ArgumentParser

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
    from paretoq.quant.functional import group_label

    lines = [f"model        {d['path']}", f"model_type   {d['model_type']}"]
    if d["format"] == "plain":
        lines.append("format       plain (not quantized)")
    else:
        group = group_label(d["group_size"])
        extra = ""
        if d["format"] == "packed":
            extra = f" in {d['scale_dtype']}" + (f", ternary codes {d['ternary_format']}" if d["w_bits"] == 1.58 else "")
        if d.get("mixed"):
            extra = f"; scales{extra}" if extra else ""
            lines.append(f"format       {d['format']}: mixed precision (per-layer bits below){extra}")
        else:
            lines.append(f"format       {d['format']}: w_bits {d['w_bits']}, scales {group}{extra}")
        tables = []
        if d.get("embed_bits", 16) != 16:
            tied = " (tied: also the LM head)" if d.get("tied_embeddings") else ""
            tables.append(f"embedding {d['embed_bits']}-bit, scales {group_label(d.get('embed_group_size'))}{tied}")
        if d.get("head_bits", 16) != 16 and not d.get("tied_embeddings"):
            tables.append(f"LM head {d['head_bits']}-bit, scales {group_label(d.get('head_group_size'))}")
        if tables:
            lines.append(f"tables       {'; '.join(tables)}")
        if d.get("a_bits", 16) == 8:
            block = d.get("a_group_size")
            where = ("per token" if block is None else "per layer as llama.cpp runs its GGUF type" if block == "gguf"
                     else f"per block of {block}")
            lines.append(f"activations  8-bit {where} (absmax) at every quantized layer's input")
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
        if d.get("mean_w_bits") is not None:
            lines.append(f"             {d['mean_w_bits']:.3f} mean w_bits (weighted by weights; no scales); "
                         f"{d['packed_bits_per_weight']:.3f} packed (codes + fp16 scales)")
        lines.append("quantized layers:")
        by_setting: dict[tuple, list[str]] = {}
        for name in d["quantized_layers"]:
            v = (d.get("layer_bits") or {}).get(name)
            by_setting.setdefault((v["w_bits"], v["group_size"]) if v else (d["w_bits"], d["group_size"]), []).append(name)
        for (bits, group_size), names in sorted(by_setting.items(), key=lambda kv: (-kv[0][0], kv[0][1] or 0)):
            weights = sum((d.get("layer_bits") or {}).get(n, {}).get("weights", 0) for n in names)
            lines.append(f"  {bits:g}-bit, {group_label(group_size)}: {len(names)} layer(s), {weights:,} weights")
            lines += [f"    {n}" for n in compact_names(names)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="paretoq info", description="Parameters, bits, bytes and quantized layers of a model "
                       "folder (reads config.json and tensor headers only).")
    add_model_argument(p, "model folder")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    model_argument(p, args)
    from paretoq.loading import folder_info

    d = folder_info(args.model)
    print(json.dumps(d, indent=2) if args.json else format_info(d), file=sys.stdout)
    return 0
