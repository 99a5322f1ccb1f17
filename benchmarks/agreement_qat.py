"""Does llama.cpp run what QAT trained? Top-1 agreement and KL of llama.cpp against paretoq's fake-quant
SmolLM2-135M after 30 QAT steps, with and without 8-bit activations in training (issue #30).

llama.cpp multiplies a quantized weight with activations it rounds to 8 bits first: blocks of 32 (Q8_0) for
Q1_0 / Q2_0 / Q4_0 weights, 256 (Q8_K) for the K and TQ types. ``--a_bits 8 --a_group_size gguf`` trains each
layer with the rounding llama.cpp will apply to it, so the exported model computes what was trained.

``ceiling``: why llama.cpp's agreement has a ceiling. SmolLM2-135M in fp32 against llama.cpp running (1) the FP
model as F32 (no rounding anywhere), (2) the 4-bit round-to-nearest model with its projections as F32 Ŵ, (3) the
same as Q4_0 (8-bit activations in llama.cpp), (4) the FP model as Q8_0 (8-bit weights and activations); then
paretoq's own 4-bit model with llama.cpp's activation rounding (``a_group_size="gguf"``) against llama.cpp's
Q4_0, and against itself with the embedding output perturbed by 1e-7 (relative, random): does an 8-bit
activation path amplify the tiniest difference?

``run``: one model per call (``--bits 4 --a8 gguf``): ``paretoq train`` (the "ours" recipe of quality_smollm2.py:
gptq scale init on 16 calibration blocks, LR 1.5e-4, 10% warm-up, cosine, bf16 autocast, 4 × 256 tokens per
step), GGUF export with the automatic type choice (embeddings F16), then ``--tokens`` held-out tokens (KJV Ruth,
Jonah, Esther) in windows of 250 through both: llama.cpp (llama-cpp-python, all logits) with its default f16 KV
cache and with an f32 one, against the fake-quant folder in fp32 (``paretoq.export.check``). A JSON line per
model in ``--results``. ``report``: the table (``--results_md``: into RESULTS.md).

    python benchmarks/agreement_qat.py run --bits 4 --a8 gguf --results /tmp/agree/rows.jsonl
    python benchmarks/agreement_qat.py report --results /tmp/agree/rows.jsonl [--results_md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

from harness import append_results, machine, set_threads

CACHE = Path(os.environ.get("PARETOQ_DEMO_CACHE", "/tmp/demo_cache"))
BLOCK = 256
WINDOW = 250


def train(a, out: Path) -> dict:
    from paretoq import assets
    from paretoq.training.args import parse_train_args
    from paretoq.training.run import run_training

    folder = assets.smollm2_folder(CACHE)
    train_file, eval_file = assets.kjv_demo_files(CACHE / "data")
    argv = ["--input_model_filename", str(folder), "--w_bits", str(a.bits),
            "--train_data_local_path", str(train_file), "--eval_data_local_path", str(eval_file),
            "--output_dir", str(out), "--model_max_length", str(BLOCK), "--cache_dir", str(CACHE / "blocks-cli"),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_steps", str(a.steps),
            "--learning_rate", str(a.lr), "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
            "--weight_decay", "0", "--bf16", "true", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "10", "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--scale_init", a.init, "--calibration_samples", "16"]
    if a.a8 != "off":
        argv += ["--a_bits", "8"] + ([] if a.a8 == "token" else ["--a_group_size", a.a8])
    t = time.perf_counter()
    metrics = run_training(parse_train_args(argv))
    return {"ppl": metrics["perplexity"], "train_seconds": round(time.perf_counter() - t, 1),
            "command": "paretoq train " + " ".join(argv)}


def run(a) -> None:
    from paretoq import assets
    from paretoq.export.check import (_llama_cpp_logits, _transformers_logits, agreement, token_windows,
                                      window_perplexity)
    from paretoq.export.gguf import export_gguf, read_gguf_tensors
    from paretoq.loading import load_model, load_tokenizer

    name = f"w{a.bits}-a8{a.a8}"
    out = Path(a.workdir) / name
    row = train(a, out)
    folder = assets.smollm2_folder(CACHE)
    _, eval_file = assets.kjv_demo_files(CACHE / "data")
    windows = token_windows(eval_file, load_tokenizer(folder), a.tokens, WINDOW)
    model = load_model(out, dtype=torch.float32)
    ours = torch.cat(_transformers_logits(model, windows))
    del model
    path = export_gguf(out, Path(a.workdir) / f"{name}.gguf", tokenizer_pre="smollm")
    counts: dict[str, int] = {}
    for t in read_gguf_tensors(path).values():
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.shape[0] * t.shape[1]
    total = sum(counts.values())
    row["ppl_windows_paretoq"] = window_perplexity(ours, windows)
    row.update(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(), bits=a.bits,
               a8=a.a8, init=a.init, steps=a.steps,
               types=", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    for kv_f32 in (False, True):
        theirs = torch.cat(_llama_cpp_logits(path, windows, WINDOW, a.threads, kv_f32=kv_f32))
        top1, kl, diff, n = agreement(ours, theirs)
        key = "kv_f32" if kv_f32 else "kv_f16"
        row[key] = {"top1": top1, "kl": kl, "max_abs_logit_diff": diff, "ppl": window_perplexity(theirs, windows)}
        row["tokens"] = n
    path.unlink()
    with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def _with_a8(model, group="gguf"):
    """The model's quantized layers with 8-bit activations in llama.cpp's blocks (same weights and scales)."""
    import dataclasses

    for m in model.modules():
        if hasattr(m, "a_block"):
            layer = dataclasses.replace(m.quant_config, a_bits=8, a_group_size=group)
            m.quant_config, m.a_block = layer, layer.activation_block("", m.in_features)
    return model


def ceiling(a) -> None:
    import copy

    from paretoq import assets, dequantize_model
    from paretoq.export.check import _llama_cpp_logits, _transformers_logits, agreement, token_windows
    from paretoq.export.gguf import export_gguf
    from paretoq.loading import load_model, load_tokenizer
    from paretoq.quant import QuantConfig, quantize_model

    folder = assets.smollm2_folder(CACHE)
    _, eval_file = assets.kjv_demo_files(CACHE / "data")
    windows = token_windows(eval_file, load_tokenizer(folder), a.tokens, WINDOW)
    work = Path(a.workdir)
    rows = []

    def engine(model, name, float_type, kv_f32=True):
        path = export_gguf(model, work / f"{name}.gguf", tokenizer=folder, tokenizer_pre="smollm", float_type=float_type)
        try:
            return torch.cat(_llama_cpp_logits(path, windows, WINDOW, a.threads, kv_f32=kv_f32))
        finally:
            path.unlink()

    def row(what, ours, theirs):
        top1, kl, diff, n = agreement(ours, theirs)
        rows.append(f"| {what} | {100 * top1:.1f}% | {kl:.2g} | {diff:.3g} |")
        print(rows[-1], flush=True)

    fp = load_model(folder, dtype=torch.float32)
    ours_fp = torch.cat(_transformers_logits(fp, windows))
    row("FP model, F32 in llama.cpp (f32 KV cache)", ours_fp, engine(fp, "fp32", "f32"))
    row("FP model, Q8_0 in llama.cpp (8-bit weights and activations)", ours_fp, engine(fp, "q8", "q8_0"))
    q = copy.deepcopy(fp)
    del fp
    quantize_model(q, QuantConfig(w_bits=4, scale_init="mse"))
    with torch.no_grad():  # the scales as GGUF stores them (fp16): llama.cpp's weights are then paretoq's exactly
        for n, p in q.named_parameters():
            if n.endswith("weight_clip_val"):
                p.copy_(p.half().float())
    ours_q = torch.cat(_transformers_logits(q, windows))
    row("4-bit RTN, projections as F32 Ŵ (no activation rounding)", ours_q,
        engine(dequantize_model(copy.deepcopy(q)), "w4f32", "f32"))
    theirs_q = engine(q, "w4q4", "f32")
    row("4-bit RTN, Q4_0 (llama.cpp rounds activations: Q8_0)", ours_q, theirs_q)
    a8 = torch.cat(_transformers_logits(_with_a8(q), windows))
    row("4-bit RTN, Q4_0 vs paretoq with the same 8-bit activations (a_group_size gguf)", a8, theirs_q)
    row("paretoq's 8-bit-activation model vs itself without them", ours_q, a8)
    torch.manual_seed(0)
    hook = q.model.embed_tokens.register_forward_hook(lambda m, args, out: out * (1 + 1e-7 * torch.randn_like(out)))
    row("paretoq's 8-bit-activation model vs itself, embedding × (1 + 1e-7·noise)", a8,
        torch.cat(_transformers_logits(q, windows)))
    hook.remove()
    lines = ["| SmolLM2-135M, fp32 reference vs | top-1 agreement | mean KL (nats) | max \\|Δlogit\\| |",
             "|---|---:|---:|---:|", *rows]
    note = (f"{a.tokens} held-out tokens in windows of {WINDOW}; llama.cpp (llama-cpp-python) with an f32 KV cache and "
            "F32 embeddings/norms, so that the only rounding left in llama.cpp is the one named")
    if a.results_md:
        append_results("Engine agreement: where llama.cpp's ceiling comes from (agreement_qat.py ceiling)",
                       f"python benchmarks/agreement_qat.py ceiling --results R --tokens {a.tokens} --results_md",
                       lines, note)
    else:
        print("\n".join(lines))


def report(a) -> None:
    rows = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    label = {"off": "none", "token": "per token", "gguf": "as llama.cpp (`--a_group_size gguf`)"}
    lines = ["| bits | 8-bit activations in QAT | GGUF types of the projections | ppl, paretoq | ppl, llama.cpp | "
             "top-1 agreement | mean KL | top-1, f32 KV | mean KL, f32 KV |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {"4": 0, "2": 1, "1.58": 2, "1": 3}
    for r in sorted(rows, key=lambda r: (order.get(str(r["bits"]), 9), r["a8"] != "off")):
        f16, f32 = r["kv_f16"], r["kv_f32"]
        lines.append(f"| {r['bits']} | {label.get(r['a8'], r['a8'])} | {r['types']} | {r['ppl_windows_paretoq']:.2f} | "
                     f"{f16['ppl']:.2f} | {100 * f16['top1']:.1f}% | {f16['kl']:.2g} | {100 * f32['top1']:.1f}% | "
                     f"{f32['kl']:.2g} |")
    r0 = rows[0]
    note = (f"SmolLM2-135M, {r0['steps']} QAT steps each ({r0['init']} init, LR {a.lr}, 4 × 256 tokens per step, bf16 "
            f"autocast); {r0['tokens']} held-out tokens in windows of {WINDOW}; llama.cpp (llama-cpp-python, default "
            "f16 KV cache unless marked f32) vs the fake-quant folder in fp32; ppl = exp(mean next-token CE) on those "
            "tokens; KL = KL(paretoq ‖ llama.cpp) in nats; rows measured one at a time, each JSON line with its own "
            "date")
    if a.results_md:
        append_results("Engine agreement after QAT: llama.cpp vs paretoq, 8-bit activations (agreement_qat.py)",
                       "python benchmarks/agreement_qat.py run --bits B --a8 off|gguf --results R (each row), "
                       "then report --results R --results_md", lines, note)
    else:
        print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("run", "report", "ceiling"))
    p.add_argument("--results", required=True)
    p.add_argument("--bits", default="4")
    p.add_argument("--a8", default="off", choices=("off", "token", "gguf", "32", "256"),
                   help="8-bit activations in training: off, per token, gguf (as llama.cpp), or a block size")
    p.add_argument("--init", default="gptq")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/agree")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results_md", action="store_true")
    a = p.parse_args()
    set_threads(a.threads)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    {"run": run, "report": report, "ceiling": ceiling}[a.part](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
