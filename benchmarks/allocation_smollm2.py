"""Pareto allocation on SmolLM2-135M (issue #31): mixed per-layer bit widths against uniform ones.

Sensitivities come from ``paretoq allocate --sensitivity FILE`` (one JSON per scale init, measured on
16 training blocks of 256 tokens drawn by seed 0 — the calibration blocks of quality_smollm2.py);
``time`` the allocate command for its wall time. Experiments (one JSON line per row in ``--results``):

``rtn``    perplexity right after quantization: FP, uniform 3- and 4-bit per row, and the allocated
           mixes at ``--budgets`` bits/weight, for each scale init (``--inits reference,gptq``).
``track``  does the estimate order candidates as the true loss increase does? For a sample of
           (layer, candidate) pairs: ΔL measured (only that layer quantized, loss re-computed on
           the same calibration blocks) against the estimate, and Spearman's ρ over the pairs
           (also per layer: does it order the candidates of one layer right?).
``qat``    30 QAT steps with the "ours" recipe of quality_smollm2.py (gptq init, LR 1.5e-4, 10%
           warm-up, cosine, bf16 autocast) for uniform 3-bit and the allocated mix at ``--qat_budget``,
           through ``paretoq train --quant_config``.
``report`` the tables (markdown).

    python benchmarks/allocation_smollm2.py rtn --results /tmp/alloc.jsonl
    python benchmarks/allocation_smollm2.py track --results /tmp/alloc.jsonl
    python benchmarks/allocation_smollm2.py qat --results /tmp/alloc.jsonl
    python benchmarks/allocation_smollm2.py report --results /tmp/alloc.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from harness import add_common_args, append_results, command, machine, set_threads

CACHE = Path(os.environ.get("PARETOQ_ALLOC_CACHE", "/tmp/alloc/cache"))
BLOCK = 256


def record(path: str, row: dict) -> None:
    row = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def setup():
    from paretoq import assets
    from paretoq.data import load_blocks
    from paretoq.loading import load_tokenizer
    from paretoq.training.recipe import calibration_blocks

    folder = assets.smollm2_folder(CACHE)
    train, evalf = assets.kjv_demo_files(CACHE / "data")
    tok = load_tokenizer(folder)
    train_blocks = load_blocks(train, tok, BLOCK, CACHE / "blocks")
    eval_blocks = load_blocks(evalf, tok, BLOCK, CACHE / "blocks")
    return folder, train, evalf, calibration_blocks(train_blocks, 16, 0), eval_blocks


def eval_subset(a, eval_blocks):
    """The first ``--eval_blocks`` held-out blocks (all by default)."""
    return eval_blocks if not a.eval_blocks else eval_blocks[:a.eval_blocks]


from quality_smollm2 import perplexity  # noqa: E402  (bf16 compute, exp(mean token CE): the same measure)


def sensitivity(a, init):
    from paretoq.allocate import Sensitivity

    path = Path(a.sensitivity_dir) / f"sens-{init}{a.sens_suffix}.json"
    if not path.is_file():
        sys.exit(f"{path} missing: run paretoq allocate --scale_init {init} --sensitivity {path} first")
    return Sensitivity.from_dict(json.loads(path.read_text()))


def bits_of(config, model) -> float:
    """Packed bits per quantizable weight (codes, ternary as base-3, + fp16 scales) of ``config``."""
    from paretoq.allocate import Candidate, candidate_bytes
    from paretoq.quant.swap import selected_linears
    from paretoq.quant.config import QuantConfig

    total = weights = 0
    for name, lin in selected_linears(model, QuantConfig(w_bits=4)):
        layer = config.for_layer(name)
        c = Candidate(layer.w_bits if layer.enabled else 16, layer.group_size)
        total += candidate_bytes(c, lin.out_features, lin.in_features)
        weights += lin.in_features * lin.out_features
    return 8 * total / weights


def run_rtn(a) -> None:
    from paretoq.allocate import allocate, allocation_config, budget_bytes
    from paretoq.loading import load_model
    from paretoq.quant import QuantConfig, quantize_model

    folder, _, _, calib, eval_blocks = setup()
    eval_blocks = eval_subset(a, eval_blocks)
    if "fp" not in a.skip:
        record(a.results, {"exp": "rtn", "config": "fp", "init": "-",
                           "ppl": perplexity(load_model(folder, dtype=torch.float32), eval_blocks),
                           "eval_tokens": eval_blocks[:, 1:].numel()})
    for init in a.inits:
        configs = [(f"uniform {b}", QuantConfig(w_bits=b, scale_init=init)) for b in a.uniform]
        sens = sensitivity(a, init) if a.budgets else None
        alloc_losses = {}
        for budget in a.budgets:
            alloc = allocate(sens, budget_bytes(sens, budget), estimate=a.estimate)
            label = f"mix {budget:g}" + (f" ({','.join(c.label for c in sens.candidates)})" if a.sens_suffix else "") + (
                f" [{a.estimate}]")
            alloc_losses[label] = alloc.loss
            configs.append((label, allocation_config(sens, alloc, init)))
        for name, config in configs:
            model = load_model(folder, dtype=torch.float32)
            bits = bits_of(config, model)  # before the swap: it reads the plain Linear layers
            t = time.perf_counter()
            quantize_model(model, config, calibration_data=calib)
            t_init = time.perf_counter() - t
            row = {"exp": "rtn", "config": name, "init": init, "bits_per_weight": bits,
                   "ppl": perplexity(model, eval_blocks), "init_seconds": round(t_init, 1),
                   "overrides": len(config.overrides), "eval_tokens": eval_blocks[:, 1:].numel()}
            if name.startswith("mix"):
                from collections import Counter

                mix = Counter()
                for n, m in model.named_modules():
                    if hasattr(m, "weight_clip_val"):
                        g = "" if m.group_size is None else f":g{m.group_size}"
                        mix[f"{m.quant_config.w_bits:g}{g}"] += m.weight.numel()
                tot = sum(mix.values())
                row["mix"] = {k: round(v / tot, 4) for k, v in sorted(mix.items())}
                row["predicted_delta_loss"] = alloc_losses.get(name)
            record(a.results, row)
            del model


@torch.no_grad()
def _loss(model, ids, batch=4) -> float:
    import torch.nn.functional as F

    total, n = 0.0, 0
    for i in range(0, len(ids), batch):
        b = ids[i:i + batch]
        logits = model(input_ids=b, use_cache=False).logits
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1),
                                 reduction="sum").item()
        n += b[:, 1:].numel()
    return total / n


def run_track(a) -> None:
    """Estimate vs true ΔL (fp32) on a sample of layers, every candidate of each, same blocks."""
    from paretoq.allocate import candidate_weights, measure_sensitivity, parse_candidates
    from paretoq.loading import load_model
    from paretoq.quant import QuantConfig

    folder, _, _, calib, _ = setup()
    ids = calib[:a.track_blocks]
    model = load_model(folder, dtype=torch.float32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and QuantConfig(w_bits=4).selects(n)]
    rng = random.Random(a.seed)
    sample = sorted(rng.sample(names, a.track_layers), key=names.index)
    candidates = parse_candidates(a.candidates)
    for init in a.inits:
        pattern = "|".join("^" + n.replace(".", r"\.") + "$" for n in sample)
        t = time.perf_counter()
        sens = measure_sensitivity(model, ids, candidates, init, quant_config=QuantConfig(w_bits=4, include=(pattern,)))
        t_est = time.perf_counter() - t
        base = _loss(model, ids)
        weights = candidate_weights(model, sample, candidates, init, calibration_data=ids)
        for li, name in enumerate(sens.layers):
            lin = model.get_submodule(name)
            original = lin.weight.data.clone()
            for ci, c in enumerate(candidates):
                lin.weight.data.copy_(weights[name][ci])
                true = _loss(model, ids) - base
                lin.weight.data.copy_(original)
                record(a.results, {"exp": "track", "init": init, "layer": name, "candidate": c.label,
                                   "estimate": sens.delta_loss[li][ci], "first_order": sens.first_order[li][ci],
                                   "true": true, "tokens": sens.tokens, "estimate_seconds": round(t_est, 1)})


def run_qat(a) -> None:
    from paretoq.allocate import allocate, allocation_config, budget_bytes
    from paretoq.files import atomic_write
    from paretoq.quant.config import quant_config_yaml
    from paretoq.training.args import parse_train_args
    from paretoq.training.run import run_training

    folder, train, evalf, _, _ = setup()
    sens = sensitivity(a, "gptq")
    alloc = allocate(sens, budget_bytes(sens, a.qat_budget), estimate=a.estimate)
    yaml_path = Path(a.workdir) / f"alloc-gptq-{a.qat_budget:g}-{a.estimate}.yaml"
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(yaml_path, quant_config_yaml(allocation_config(sens, alloc, "gptq")))
    common = ["--input_model_filename", str(folder), "--train_data_local_path", str(train),
              "--eval_data_local_path", str(evalf), "--model_max_length", str(BLOCK),
              "--cache_dir", str(CACHE / "blocks-cli"), "--per_device_train_batch_size", "4",
              "--per_device_eval_batch_size", "4", "--max_steps", str(a.steps), "--lr_scheduler_type", "cosine",
              "--weight_decay", "0", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "5",
              "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--bf16", "true",
              "--learning_rate", str(a.lr), "--warmup_steps", "0.1", "--scale_init", "gptq",
              "--calibration_samples", "16"]
    mix = f"mix {a.qat_budget:g} [{a.estimate}]"
    plans = {"uniform 3": ["--w_bits", "3"], mix: ["--quant_config", str(yaml_path)]}
    for name in a.qat_plans:
        key = name if name in plans else mix if name == "mix" else name
        out = os.path.join(a.workdir, key.replace(" ", "-"))
        argv = [*common, "--output_dir", out, *plans[key]]
        t = time.perf_counter()
        metrics = run_training(parse_train_args(argv))
        from paretoq.loading import folder_info

        info = folder_info(metrics["final_model_dir"])
        record(a.results, {"exp": "qat", "config": key, "init": "gptq", "steps": a.steps, "ppl": metrics["perplexity"],
                           "train_loss": metrics.get("train_loss"), "seconds": round(time.perf_counter() - t, 1),
                           "packed_bits_per_weight": info["packed_bits_per_weight"],
                           "mean_w_bits": info["mean_w_bits"], "command": "paretoq train " + " ".join(argv)})


def report(a) -> None:
    rows = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    fp = next((r["ppl"] for r in rows if r["exp"] == "rtn" and r["config"] == "fp"), None)
    out = []
    if fp:
        out += [f"FP perplexity {fp:.2f}.", "",
                "| scale init | config | bits/weight | perplexity | log-ppl loss vs FP | recovered of uniform 3-bit's loss |",
                "|---|---|---:|---:|---:|---:|"]
        for init in dict.fromkeys(r["init"] for r in rows if r["exp"] == "rtn" and r["init"] != "-"):
            sub = [r for r in rows if r["exp"] == "rtn" and r["init"] == init]
            u3 = next((r["ppl"] for r in sub if r["config"] == "uniform 3"), None)
            for r in sub:
                loss = math.log(r["ppl"] / fp)
                rec = "" if u3 is None or r["config"] == "uniform 3" else f"{1 - loss / math.log(u3 / fp):.1%}"
                out.append(f"| {init} | {r['config']} | {r['bits_per_weight']:.3f} | {r['ppl']:,.2f} | {loss:.3f} | {rec} |")
    track = [r for r in rows if r["exp"] == "track"]
    if track:
        out += ["", "| scale init | pairs | Spearman ρ (estimate vs true ΔL) | layers whose candidates it orders right |",
                "|---|---:|---:|---:|"]
        for init in dict.fromkeys(r["init"] for r in track):
            sub = [r for r in track if r["init"] == init]
            rho = spearman([r["estimate"] for r in sub], [r["true"] for r in sub])
            layers = dict.fromkeys(r["layer"] for r in sub)
            right = sum(_same_order([r for r in sub if r["layer"] == n]) for n in layers)
            out.append(f"| {init} | {len(sub)} | {rho:.3f} | {right}/{len(layers)} |")
    qat = [r for r in rows if r["exp"] == "qat"]
    if qat:
        out += ["", "| 30-step QAT (gptq init) | packed bits/weight | perplexity |", "|---|---:|---:|"]
        out += [f"| {r['config']} | {r['packed_bits_per_weight']:.3f} | {r['ppl']:.2f} |" for r in qat]
    if a.results_md:
        append_results("Pareto allocation on SmolLM2-135M (allocation_smollm2.py)", command("allocation_smollm2.py"), out,
                       note="rows measured over several runs on a shared 2-core machine; each JSON line in "
                            f"{a.results} carries its own date and load")
    else:
        print("\n".join(out))


def _same_order(rows) -> bool:
    by_est = [r["candidate"] for r in sorted(rows, key=lambda r: r["estimate"])]
    by_true = [r["candidate"] for r in sorted(rows, key=lambda r: r["true"])]
    return by_est == by_true


def spearman(x, y) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((p - mx) * (q - my) for p, q in zip(rx, ry))
    return cov / math.sqrt(sum((p - mx) ** 2 for p in rx) * sum((q - my) ** 2 for q in ry))


def main() -> None:
    from paretoq.allocate import DEFAULT_ESTIMATE

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("exp", choices=("rtn", "track", "qat", "report"))
    p.add_argument("--results", required=True)
    p.add_argument("--sensitivity_dir", default="/tmp/alloc")
    p.add_argument("--estimate", default=DEFAULT_ESTIMATE, help="rtn, qat: the allocator's score (clipped, fisher or "
                   "taylor; default clipped)")
    p.add_argument("--sens_suffix", default="", help="sensitivity file sens-<init><suffix>.json (another candidate set)")
    p.add_argument("--inits", default="reference,gptq")
    p.add_argument("--budgets", default="3.0,2.5")
    p.add_argument("--uniform", default="3,4")
    p.add_argument("--skip", default="")
    p.add_argument("--candidates", default="1.58,2,3,4", help="track: the candidates measured")
    p.add_argument("--track_layers", type=int, default=10)
    p.add_argument("--track_blocks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--qat_budget", type=float, default=2.5)
    p.add_argument("--qat_plans", default="uniform 3,mix")
    p.add_argument("--workdir", default="/tmp/alloc/qat")
    p.add_argument("--eval_blocks", type=int, default=0, help="rtn: evaluate on the first N held-out blocks (0 = all)")
    p.add_argument("--results_md", action="store_true", help="report: write the tables to benchmarks/RESULTS.md")
    add_common_args(p, threads=1, append=False)
    a = p.parse_args()
    a.inits = [s for s in a.inits.split(",") if s]
    a.budgets = [float(s) for s in a.budgets.split(",") if s and s != "none"]
    a.uniform = [float(s) if "." in s else int(s) for s in a.uniform.split(",") if s and s != "none"]
    a.qat_plans = [s.strip() for s in a.qat_plans.split(",") if s.strip()]
    a.skip = a.skip.split(",")
    set_threads(a.threads)
    {"rtn": run_rtn, "track": run_track, "qat": run_qat, "report": report}[a.exp](a)


if __name__ == "__main__":
    main()
