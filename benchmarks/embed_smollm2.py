"""Quantized embeddings and 8-bit activations on SmolLM2-135M (issue #30, docs/formats.md).

``size --variant 16|4|8``: 2-bit QAT (per-row scales) for ``--steps`` steps with the embedding in bf16
(16) or quantized to 4 / 8 bits in groups of 32 (SmolLM2 ties the LM head to it, so that one matrix
serves both), through ``paretoq train``'s own code path (docs/quality.md's recipe: gptq init, LR 2e-4,
10% warm-up, cosine; eager quantizer, so no kernel build); one JSON line per variant to
<workdir>/size.jsonl (variants can run side by side); ``report`` writes the table. Measured: the held-out
perplexity (KJV books Ruth, Jonah, Esther in 256-token blocks, bf16 autocast) and the size of the
packed export (``save_packed``: fp16 scales, bf16 for the rest), and checks that an fp32 packed copy,
reloaded, gives the fake-quant model's logits bit for bit (fp32, scales rounded to fp16).

``agreement``: ternary QAT with and without ``--a_bits 8`` (same steps and data), each exported to
GGUF and run by llama.cpp (llama-cpp-python, all logits) on ``--agree_tokens`` held-out tokens: top-1
agreement and mean KL(paretoq ‖ llama.cpp) of the next-token distributions against paretoq's fake-quant
model (fp32 forward, and with a_bits 8 its own activation rounding).

    nice python benchmarks/embed_smollm2.py size --variant 16 --steps 30 --workdir /tmp/embed_bench &
    nice python benchmarks/embed_smollm2.py size --variant 4 --steps 30 --workdir /tmp/embed_bench
    python benchmarks/embed_smollm2.py report --workdir /tmp/embed_bench
    nice python benchmarks/embed_smollm2.py agreement --steps 30 --workdir /tmp/embed_bench &
    nice python benchmarks/embed_smollm2.py agreement --a8 --steps 30 --workdir /tmp/embed_bench
    python benchmarks/embed_smollm2.py agreement_report --workdir /tmp/embed_bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness import append_results, command, set_threads

CACHE = Path(os.environ.get("PARETOQ_DEMO_CACHE", "/tmp/demo_cache"))
BLOCK = 256
# docs/quality.md's recipe ("ours"): gptq scale init on 16 calibration blocks (the embedding: reference init)
RECIPE = ["--scale_init", "gptq", "--calibration_samples", "16"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def train(a, name: str, bits, extra: list[str]) -> tuple[Path, dict]:
    from paretoq import assets
    from paretoq.training.args import parse_train_args
    from paretoq.training.run import run_training

    folder = assets.smollm2_folder(CACHE)
    train_file, eval_file = assets.kjv_demo_files(CACHE / "data")
    out = Path(a.workdir) / name
    argv = ["--input_model_filename", str(folder), "--w_bits", str(bits),
            "--train_data_local_path", str(train_file), "--eval_data_local_path", str(eval_file),
            "--output_dir", str(out), "--model_max_length", str(BLOCK), "--cache_dir", str(CACHE / "blocks-cli"),
            "--per_device_train_batch_size", str(a.batch), "--per_device_eval_batch_size", "4",
            "--max_steps", str(a.steps), "--learning_rate", str(a.lr), "--warmup_steps", "0.1",
            "--lr_scheduler_type", "cosine", "--weight_decay", "0", "--bf16", "true", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", "10", "--seed", "0", "--dataloader_num_workers", "0",
            "--disable_tqdm", "true", "--compile_quantizer", "false", *extra]
    t = time.perf_counter()
    metrics = run_training(parse_train_args(argv))
    row = {"name": name, "ppl": metrics["perplexity"], "seconds": round(time.perf_counter() - t, 1),
           "command": "paretoq train " + " ".join(argv)}
    print(json.dumps(row), flush=True)
    return out, row


def eval_ids(n: int) -> list[int]:
    from paretoq import assets
    from paretoq.loading import load_tokenizer

    _, eval_file = assets.kjv_demo_files(CACHE / "data")
    tok = load_tokenizer(assets.smollm2_folder(CACHE))
    text = " ".join(json.loads(line)["text"] for line in Path(eval_file).read_text().splitlines()[:400])
    return tok(text)["input_ids"][:n]


@torch.no_grad()
def packed_check(fake_dir: Path, packed_dir: Path) -> bool:
    """load_packed logits == the fake-quant model's with its scales rounded to fp16 (fp32, bit for bit)."""
    from paretoq.export.packed import load_packed
    from paretoq.loading import load_model

    fake = load_model(fake_dir, dtype=torch.float32)
    for name, p in fake.named_parameters():
        if name.endswith("weight_clip_val"):
            p.copy_(p.half().float())
    packed = load_packed(packed_dir, dtype=torch.float32)
    ids = torch.tensor([eval_ids(128)])
    return torch.equal(fake(ids).logits, packed(ids).logits)


SIZE_VARIANTS = {"16": [], "4": ["--embed_bits", "4", "--embed_group_size", "32"],
                 "8": ["--embed_bits", "8", "--embed_group_size", "32"]}


def run_size(a, variant: str) -> dict:
    """One variant: train, pack, check; its row goes to <workdir>/size.jsonl (``report`` makes the table)."""
    from paretoq.export.packed import save_packed

    name = f"w2-embed{variant}"
    out, row = train(a, name, 2, SIZE_VARIANTS[variant] + RECIPE)
    packed = Path(a.workdir) / f"{name}-packed"
    save_packed(out, packed)  # the deliverable: bf16 for the unquantized tensors
    fp32 = Path(a.workdir) / f"{name}-packed-fp32"  # for the bit-for-bit check (fp32 everywhere)
    save_packed(out, fp32, dtype=torch.float32)
    row.update(variant=variant, size=(packed / "model.safetensors").stat().st_size, folder=folder_bytes(packed),
               exact=packed_check(out, fp32), steps=a.steps, batch=a.batch)
    with open(Path(a.workdir) / "size.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def size_table(a) -> list[str]:
    rows = {}
    for line in (Path(a.workdir) / "size.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["variant"]] = r
    base = rows["16"]["ppl"]
    lines = [f"| SmolLM2-135M, 2-bit per row, {rows['16']['steps']} QAT steps × {rows['16']['batch']}×{BLOCK} tokens "
             "| held-out ppl | Δ ppl | packed model.safetensors | load_packed logits = fake-quant (fp32) | train+eval s |",
             "|---|---|---|---|---|---|"]
    for v, label in (("16", "bf16 embedding (today)"), ("4", "4-bit embedding, group 32 (tied head)"),
                     ("8", "8-bit embedding, group 32 (tied head)")):
        if v in rows:
            r = rows[v]
            lines.append(f"| {label} | {r['ppl']:.2f} | {r['ppl'] - base:+.2f} ({r['ppl'] / base - 1:+.1%}) | "
                         f"{r['size'] / 1e6:.1f} MB | {'bit for bit' if r['exact'] else 'DIFFERS'} | {r['seconds']:.0f} |")
    return lines


@torch.no_grad()
def agreement(fake_dir: Path, gguf_path: Path, ids: list[int]) -> tuple[float, float]:
    import llama_cpp

    from paretoq.loading import load_model

    model = load_model(fake_dir, dtype=torch.float32)
    ours = model(torch.tensor([ids])).logits[0].double()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(ids) + 8, n_threads=2, logits_all=True,
                          verbose=False)
    try:
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64)
    finally:
        llm.close()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).double().mean().item()
    p = torch.log_softmax(ours, -1)
    kl = (p.exp() * (p - torch.log_softmax(theirs, -1))).sum(-1).mean().item()
    return top1, kl


def run_agreement(a, a8: bool) -> dict:
    """One variant (with or without --a_bits 8): train, export GGUF, measure; a row to <workdir>/agree.jsonl."""
    from paretoq.export.gguf import export_gguf

    ids = eval_ids(a.agree_tokens)
    name = "w158" + ("-a8" if a8 else "")
    out, row = train(a, name, 1.58, (["--a_bits", "8"] if a8 else []) +
                     ["--scale_init", a.agree_init, "--calibration_samples", "16"])
    path = export_gguf(out, Path(a.workdir) / f"{name}.gguf")
    top1, kl = agreement(out, path, ids)
    row.update(a8=a8, top1=top1, kl=kl, tokens=len(ids), steps=a.steps, init=a.agree_init)
    with open(Path(a.workdir) / "agree.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def agreement_table(a) -> list[str]:
    rows = {r["a8"]: r for r in map(json.loads, (Path(a.workdir) / "agree.jsonl").read_text().splitlines())}
    r0 = next(iter(rows.values()))
    lines = [f"| SmolLM2-135M ternary (per row), {r0['steps']} QAT steps, {r0['init']} init; GGUF (Q4_0 + TQ2_0) in "
             f"llama.cpp vs paretoq fake-quant (fp32), {r0['tokens']} held-out tokens | held-out ppl | top-1 agreement "
             "| mean KL(paretoq ‖ llama.cpp) |", "|---|---|---|---|"]
    for a8, label in ((False, "QAT without --a_bits"), (True, "QAT with --a_bits 8")):
        if a8 in rows:
            r = rows[a8]
            lines.append(f"| {label} | {r['ppl']:.1f} | {r['top1']:.1%} | {r['kl']:.4f} |")
    return lines


def recheck(a) -> None:
    """Rewrite each size row's ``exact`` with an fp32 packed copy (the bf16 export rounds the unquantized
    tensors — norms, a bf16 embedding — so only an fp32 one can equal the fp32 fake-quant model)."""
    from paretoq.export.packed import save_packed

    rows = [json.loads(line) for line in (Path(a.workdir) / "size.jsonl").read_text().splitlines()]
    for r in rows:
        out = Path(a.workdir) / r["name"]
        fp32 = Path(a.workdir) / f"{r['name']}-packed-fp32"
        save_packed(out, fp32, dtype=torch.float32)
        r["exact"] = packed_check(out, fp32)
        print(r["name"], "exact" if r["exact"] else "DIFFERS", flush=True)
    (Path(a.workdir) / "size.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="+", choices=("size", "recheck", "report", "agreement", "agreement_report"))
    p.add_argument("--a8", action="store_true", help="agreement: the --a_bits 8 run")
    p.add_argument("--agree_init", default="reference", help="agreement: --scale_init of the ternary runs")
    p.add_argument("--variant", choices=tuple(SIZE_VARIANTS), default="16", help="size: which embedding")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--agree_tokens", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/embed_bench")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args()
    set_threads(a.threads)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    cmd = command("embed_smollm2.py")
    note = f"gptq scale init (embedding: reference), LR {a.lr}, 10% warm-up, cosine, bf16 autocast, fp32 master weights"
    for part in a.parts:
        if part in ("size", "agreement", "recheck"):
            {"size": lambda: run_size(a, a.variant), "agreement": lambda: run_agreement(a, a.a8),
             "recheck": lambda: recheck(a)}[part]()
            continue
        lines = size_table(a) if part == "report" else agreement_table(a)
        print("\n".join(lines), flush=True)
        if not a.no_append:
            title = ("Quantized embeddings: SmolLM2-135M 2-bit packed size and ppl" if part == "report" else
                     "8-bit activations: ternary SmolLM2-135M in llama.cpp, top-1 agreement")
            append_results(title, cmd, lines, note=note if part == "report" else
                           f"{a.agree_init} scale init, LR {a.lr}, 10% warm-up, cosine, bf16 autocast, fp32 master")
    return 0


if __name__ == "__main__":
    sys.exit(main())
