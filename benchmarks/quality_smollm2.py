"""Quality beyond ParetoQ on a real LM: SmolLM2-135M on King James Bible text (docs/quality.md).

Two experiments, each appending one JSON line per configuration to ``--results`` as soon as it
is measured (a long run that dies keeps what it finished):

``rtn``  perplexity right after quantization (no training) for every bit width × scale layout
         (per row, group 64) × scale init (reference, mse, mse_act, gptq).
``qat``  perplexity after a fixed budget (``--steps`` × ``--batch`` × ``--block`` tokens, the same
         blocks in the same order for every variant):
           fp      the FP model fine-tuned with our recipe (the yardstick)
           seed    the seed's recipe: weights, scales and AdamW state in pure bf16 (model loaded in
                   bf16, no autocast), reference scale init, LR 2e-5, cosine, no warm-up
           ours    fp32 master weights + bf16 autocast, gptq init (``--ours_init``; mse_act scales +
                   error feedback), tuned LR, 10% warm-up, cosine
           ours_kd ours + distillation from the FP model (kd_weight 0.5, T = 1)
         ``fp``, ``ours`` and ``ours_kd`` run through ``paretoq train``'s own code path
         (``parse_train_args`` + ``run_training``); ``seed`` builds the Trainer by hand because our
         CLI always keeps fp32 master weights.
``report`` renders the JSON lines as markdown tables (``--append FILE`` adds them to a file).

Eval: the held-out books (Ruth, Jonah, Esther; ``assets.kjv_demo_files``) in 256-token blocks,
bf16 compute, perplexity = exp(mean token cross-entropy). Torch runs single-threaded by default:
on an oversubscribed 2-core machine one intra-op thread is several times faster than two.

    .venv/bin/python benchmarks/quality_smollm2.py rtn --results /tmp/quality.jsonl
    .venv/bin/python benchmarks/quality_smollm2.py qat --results /tmp/quality.jsonl --bits 4,3,2
    .venv/bin/python benchmarks/quality_smollm2.py report --results /tmp/quality.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from harness import add_common_args, parse_bits, set_threads

CACHE = Path(os.environ.get("PARETOQ_DEMO_CACHE", "/tmp/demo_cache"))
BLOCK = 256
INITS = ("reference", "mse", "mse_act", "gptq")
OURS_LR = {4: 1e-4, 3: 1.5e-4, 2: 2e-4, 1.58: 2e-4, 1: 2e-4}  # see docs/quality.md for how they were chosen
FP_LR = 1e-4
SEED_LR = 2e-5


def machine() -> str:
    return (f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"{platform.machine()}")


def record(path: str, row: dict) -> None:
    row = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def data(tokenizer):
    from paretoq import assets
    from paretoq.data import load_blocks

    train, evalf = assets.kjv_demo_files(CACHE / "data")
    cache = CACHE / "blocks"
    return train, evalf, load_blocks(train, tokenizer, BLOCK, cache), load_blocks(evalf, tokenizer, BLOCK, cache)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 4) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss.float().item()
        n = ids[:, 1:].numel()
        total, count = total + loss * n, count + n
    return math.exp(total / count)


def calibration(train_blocks: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    from paretoq.training.recipe import calibration_blocks

    return calibration_blocks(train_blocks, n, seed)


# --- RTN ----------------------------------------------------------------------------------------


def run_rtn(a) -> None:
    from paretoq.loading import load_model, load_tokenizer
    from paretoq.quant import QuantConfig, quantize_model

    folder = __import__("paretoq.assets", fromlist=["x"]).smollm2_folder(CACHE)
    tok = load_tokenizer(folder)
    _, _, train_blocks, eval_blocks = data(tok)
    calib = calibration(train_blocks, a.calibration_samples)
    if "fp" not in a.skip:
        t = time.perf_counter()
        ppl = perplexity(load_model(folder, dtype=torch.float32), eval_blocks)
        record(a.results, {"exp": "rtn", "bits": 16, "group": None, "init": "-", "ppl": ppl,
                           "eval_tokens": eval_blocks[:, 1:].numel(), "seconds": round(time.perf_counter() - t, 1)})
    for bits in a.bits:
        for group in a.groups:
            for init in a.inits:
                model = load_model(folder, dtype=torch.float32)
                t = time.perf_counter()
                config = QuantConfig(w_bits=bits, group_size=group, scale_init=init)
                quantize_model(model, config, calibration_data=calib)
                t_init = time.perf_counter() - t
                ppl = perplexity(model, eval_blocks)
                record(a.results, {"exp": "rtn", "bits": bits, "group": group, "init": init, "ppl": ppl,
                                   "init_seconds": round(t_init, 1), "calibration_blocks": len(calib)})


# --- QAT ----------------------------------------------------------------------------------------


def _common_flags(a, out: str) -> list[str]:
    train, evalf = __import__("paretoq.assets", fromlist=["x"]).kjv_demo_files(CACHE / "data")
    return ["--train_data_local_path", str(train), "--eval_data_local_path", str(evalf),
            "--output_dir", out, "--model_max_length", str(BLOCK), "--cache_dir", str(CACHE / "blocks-cli"),
            "--per_device_train_batch_size", str(a.batch), "--per_device_eval_batch_size", "4",
            "--max_steps", str(a.steps), "--lr_scheduler_type", "cosine", "--weight_decay", "0",
            "--save_strategy", "no", "--report_to", "none", "--logging_steps", "5", "--seed", "0",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true"]


def _cli_run(a, name: str, bits, extra: list[str]) -> dict:
    from paretoq.training.args import parse_train_args
    from paretoq.training.run import run_training

    folder = __import__("paretoq.assets", fromlist=["x"]).smollm2_folder(CACHE)
    out = os.path.join(a.workdir, f"{name}-{bits}")
    argv = ["--input_model_filename", str(folder), "--w_bits", str(bits), *_common_flags(a, out), *extra]
    t = time.perf_counter()
    metrics = run_training(parse_train_args(argv))
    return {"ppl": metrics["perplexity"], "train_loss": metrics.get("train_loss"),
            "seconds": round(time.perf_counter() - t, 1), "command": "paretoq train " + " ".join(argv)}


def _seed_run(a, bits) -> dict:
    """The seed's recipe: everything in bf16 (no fp32 master), reference init, LR 2e-5, no warm-up."""
    from transformers import TrainingArguments, default_data_collator

    from paretoq.data import BlockDataset
    from paretoq.loading import load_model, load_tokenizer
    from paretoq.quant import QuantConfig, quantize_model
    from paretoq.training.trainer import QATTrainer

    folder = __import__("paretoq.assets", fromlist=["x"]).smollm2_folder(CACHE)
    tok = load_tokenizer(folder)
    _, _, train_blocks, eval_blocks = data(tok)
    model = load_model(folder, dtype=torch.bfloat16)
    quantize_model(model, QuantConfig(w_bits=bits))
    model.to(torch.bfloat16)  # the seed's weight_clip_val is bf16 too
    out = os.path.join(a.workdir, f"seed-{bits}")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.batch, per_device_eval_batch_size=4,
                             max_steps=a.steps, learning_rate=SEED_LR, lr_scheduler_type="cosine", warmup_steps=0,
                             weight_decay=0.0, save_strategy="no", report_to="none", logging_steps=5, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, bf16=False, use_cpu=True)
    trainer = QATTrainer(model=model, args=args, train_dataset=BlockDataset(train_blocks),
                         eval_dataset=BlockDataset(eval_blocks), data_collator=default_data_collator)
    t = time.perf_counter()
    result = trainer.train()
    ev = trainer.evaluate()
    return {"ppl": math.exp(ev["eval_loss"]), "train_loss": result.metrics.get("train_loss"),
            "seconds": round(time.perf_counter() - t, 1)}


def run_qat(a) -> None:
    for variant, bits in a.plan:
        t0 = time.perf_counter()
        if variant == "seed":
            row = _seed_run(a, bits)
            row["recipe"] = f"bf16 weights+scales+AdamW, reference init, LR {SEED_LR}, cosine, no warm-up"
        elif variant == "fp":
            row = _cli_run(a, "fp", 16, ["--bf16", "true", "--learning_rate", str(FP_LR), "--warmup_steps", "0.1"])
            row["recipe"] = f"fp32 master + bf16 autocast, LR {FP_LR}, 10% warm-up, cosine"
        else:
            lr = a.lr or OURS_LR[bits]
            recipe = f"fp32 master + bf16 autocast, {a.ours_init} init, LR {lr}, 10% warm-up, cosine"
            extra = ["--bf16", "true", "--learning_rate", str(lr), "--warmup_steps", "0.1",
                     "--scale_init", a.ours_init, "--calibration_samples", str(a.calibration_samples)]
            if a.qat_group:
                extra += ["--group_size", str(a.qat_group)]
            if a.qat_start_fraction:
                extra += ["--qat_start_fraction", str(a.qat_start_fraction)]
                recipe += f", FP phase {a.qat_start_fraction:.0%} then QAT (re-warm-up)"
            if variant == "ours_kd":
                extra += ["--kd_weight", str(a.kd_weight), "--kd_temperature", "1", "--kd_teacher_dtype", "bf16"]
                recipe += f", KD w={a.kd_weight} T=1 (bf16 teacher)"
            row = _cli_run(a, variant if not a.tag else f"{variant}-{a.tag}", bits, extra)
            row["recipe"] = recipe
        record(a.results, {"exp": "qat", "variant": variant if not a.tag else f"{variant}-{a.tag}", "bits": bits,
                           "group": a.qat_group if variant.startswith("ours") else None, "steps": a.steps,
                           "tokens": a.steps * a.batch * BLOCK, **row, "wall_seconds": round(time.perf_counter() - t0, 1)})


# --- report -------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "inf"
    return f"{x:.3g}" if x >= 1e4 else f"{x:.1f}" if x >= 100 else f"{x:.2f}"


def report(a) -> str:
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    lines = []
    rtn = [r for r in rows if r["exp"] == "rtn"]
    if rtn:
        fp = next((r["ppl"] for r in rtn if r["bits"] == 16), None)
        last = {}
        for r in rtn:
            if r["bits"] != 16:
                last[(r["bits"], r["group"], r["init"])] = r["ppl"]
        lines += [f"RTN (no training) perplexity, FP = {_fmt(fp)}:", "",
                  "| bits | scales | " + " | ".join(INITS) + " | mse_act / reference | gptq / reference |",
                  "|---|---|" + "---|" * (len(INITS) + 2)]
        for bits in sorted({k[0] for k in last}, reverse=True):
            for group in sorted({k[1] for k in last if k[0] == bits}, key=lambda g: g or 10**9, reverse=True):
                vals = dict(zip(INITS, (last.get((bits, group, i)) for i in INITS)))

                def ratio(init):
                    return f"{vals[init] / vals['reference']:.3g}" if vals["reference"] and vals[init] else "–"

                lines.append(f"| {bits} | {'row' if group is None else f'g{group}'} | "
                             + " | ".join(_fmt(v) if v else "–" for v in vals.values())
                             + f" | {ratio('mse_act')} | {ratio('gptq')} |")
        lines.append("")
    qat = [r for r in rows if r["exp"] == "qat"]
    if qat:
        last = {(r["variant"], r["bits"]): r for r in qat}
        fp = next((r for (v, b), r in last.items() if v == "fp"), None)
        tokens = qat[-1]["tokens"]
        lines += [f"QAT perplexity after {qat[-1]['steps']} steps ({tokens:,} tokens), per-row scales"
                  + (f"; FP fine-tuned with the same tokens: {_fmt(fp['ppl'])}" if fp else "") + ":", ""]
        variants = [v for v in ("seed", "ours", "ours_kd") if any(k[0] == v for k in last)]
        variants += sorted({k[0] for k in last} - set(variants) - {"fp"})
        lines += ["| bits | " + " | ".join(variants) + " | ours / seed | ours / FP-ft |",
                  "|---|" + "---|" * (len(variants) + 2)]
        for bits in sorted({k[1] for k in last if k[0] != "fp"}, reverse=True):
            vals = [last.get((v, bits), {}).get("ppl") for v in variants]
            seed, ours = last.get(("seed", bits), {}).get("ppl"), last.get(("ours", bits), {}).get("ppl")
            r1 = f"{ours / seed:.3g}" if seed and ours else "–"
            r2 = f"{ours / fp['ppl']:.3g}" if fp and ours else "–"
            lines.append(f"| {bits} | " + " | ".join(_fmt(v) if v else "–" for v in vals) + f" | {r1} | {r2} |")
        lines.append("")
    text = "\n".join(lines)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text + "\n")
    print(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["rtn", "qat", "report"])
    p.add_argument("--results", default="/tmp/quality.jsonl")
    add_common_args(p, threads=1, append=False)
    p.add_argument("--bits", default="4,3,2,1.58")
    p.add_argument("--groups", default="row,64")
    p.add_argument("--inits", default=",".join(INITS))
    p.add_argument("--calibration_samples", type=int, default=16)
    p.add_argument("--skip", default="", help="rtn: 'fp' skips the FP row")
    p.add_argument("--variants", default="fp,ours,seed,ours_kd")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="qat: override the LR of 'ours'")
    p.add_argument("--ours_init", default="gptq")
    p.add_argument("--kd_weight", type=float, default=0.5)
    p.add_argument("--qat_start_fraction", type=float, default=0.0, help="qat: FP phase for 'ours'")
    p.add_argument("--qat_group", type=int, default=None, help="qat: group size for 'ours' (default per row)")
    p.add_argument("--tag", default="", help="qat: suffix for variant names (LR probes)")
    p.add_argument("--workdir", default="/tmp/quality-runs")
    p.add_argument("--append", default=None, help="report: append the tables to this file")
    a = p.parse_args(argv)
    set_threads(a.threads)
    a.bits = [parse_bits(b) for b in a.bits.split(",")]
    a.groups = [None if g == "row" else int(g) for g in a.groups.split(",")]
    a.inits = a.inits.split(",")
    a.skip = a.skip.split(",")
    variants = a.variants.split(",")
    # fp once, then for each bit width the variants in the given order
    a.plan = ([("fp", 16)] if "fp" in variants else []) + [(v, b) for b in a.bits for v in variants if v != "fp"]
    {"rtn": run_rtn, "qat": run_qat, "report": report}[a.what](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
