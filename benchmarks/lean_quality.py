"""Quality of lean precision (``--master_weights bf16``) against fp32 master weights on a real LM.

SmolLM2-135M on the KJV text, the recipe of ``quality_smollm2.py qat`` (``ours``: gptq scale init on
16 calibration blocks, its tuned LR, 10% warm-up, cosine, bf16 compute), ``--steps`` × ``--batch`` ×
256 tokens, the same blocks in the same order and the same initial scales for both: they differ
only in the master weights (fp32 + fp32 AdamW, or bf16 + torchao's 8-bit AdamW with stochastic
rounding, ``--optim``). Reports eval perplexity (held-out books), the lean/fp32 ratio (the goal:
≤ 1.02 at 4 bits, ≤ 1.05 at 2 bits) and each run's training-state bytes per parameter and peak RSS.
Both runs go through ``paretoq train``'s code path (``parse_train_args`` + ``run_training``).

    python benchmarks/lean_quality.py [--bits 4,2] [--steps 30] [--batch 4] [--optim adamw_torch_8bit]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from harness import add_common_args, append_results, command, parse_bits, set_threads
from quality_smollm2 import BLOCK, CACHE, OURS_LR, record

GOAL = {4: 1.02, 2: 1.05}


def _run(a, bits, master: str) -> dict:
    from transformers import TrainerCallback

    from paretoq.training.args import parse_train_args
    from paretoq.training.lean import peak_memory_bytes, training_state_bytes
    from paretoq.training.run import run_training
    from quality_smollm2 import _common_flags

    class State(TrainerCallback):  # training-state bytes just before the last optimizer step
        bytes = None

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step + 1 >= state.max_steps:
                State.bytes = training_state_bytes(model, optimizer)

    folder = __import__("paretoq.assets", fromlist=["x"]).smollm2_folder(CACHE)
    out = os.path.join(a.workdir, f"{master}-{bits}")
    lr = OURS_LR[bits]
    argv = ["--input_model_filename", str(folder), "--w_bits", str(bits), *_common_flags(a, out),
            "--bf16", "true", "--learning_rate", str(lr), "--warmup_steps", "0.1", "--scale_init", "gptq",
            "--calibration_samples", "16", "--master_weights", master]
    if master == "bf16":
        argv += ["--optim", a.optim]
    t = time.perf_counter()
    metrics = run_training(parse_train_args(argv), callbacks=[State()])
    state = State.bytes or {}
    return {"ppl": metrics["perplexity"], "train_loss": metrics.get("train_loss"),
            "bytes_per_parameter": round(state.get("per_parameter", float("nan")), 3),
            "peak_rss_gb": round(peak_memory_bytes() / 1e9, 2), "seconds": round(time.perf_counter() - t, 1),
            "command": "paretoq train " + " ".join(argv)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="4,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--optim", default="adamw_torch_8bit", help="lean runs' optimizer (adamw_torch_8bit | _4bit)")
    p.add_argument("--results", default="/tmp/lean_quality.jsonl")
    p.add_argument("--workdir", default="/tmp/lean-quality-runs")
    p.add_argument("--report", action="store_true", help="only render --results' rows (e.g. of an interrupted run)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # BITS:MASTER, in a child process
    add_common_args(p)
    a = p.parse_args(argv)
    set_threads(a.threads)
    if a.one:
        bits, master = a.one.split(":")
        print("RESULT " + json.dumps(_run(a, parse_bits(bits), master)), flush=True)
        return 0
    rows = []
    if a.report:
        rows = [json.loads(line) for line in open(a.results) if line.strip()]
    for bits in [] if a.report else [parse_bits(b) for b in a.bits.split(",")]:
        for master in ("fp32", "bf16"):  # each in a fresh process: its own peak RSS
            cmd = [sys.executable, __file__, "--one", f"{bits}:{master}", "--steps", str(a.steps), "--batch",
                   str(a.batch), "--optim", a.optim, "--workdir", a.workdir, "--threads", str(a.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            row = {"exp": "lean", "bits": bits, "master": master, "optim": a.optim if master == "bf16" else "adamw",
                   "steps": a.steps, "tokens": a.steps * a.batch * BLOCK, **result}
            record(a.results, row)
            rows.append(row)
    lines = ["| bits | master weights + optimizer | eval ppl | lean / fp32 | goal | state bytes/param | peak RSS GB "
             "| run s |", "|---|---|---|---|---|---|---|---|"]
    for bits in sorted({r["bits"] for r in rows}, reverse=True):
        fp = next((r for r in rows if r["bits"] == bits and r["master"] == "fp32"), None)
        for r in (r for r in rows if r["bits"] == bits):
            ratio = f"{r['ppl'] / fp['ppl']:.4f}" if fp else "–"
            what = "fp32 + AdamW fp32" if r["master"] == "fp32" else f"bf16 + {r['optim']} (stochastic rounding)"
            goal = f"≤ {GOAL[bits]}" if bits in GOAL and r["master"] == "bf16" else ""
            lines.append(f"| {bits} | {what} | {r['ppl']:.2f} | {ratio} | {goal} | {r['bytes_per_parameter']} | "
                         f"{r['peak_rss_gb']} | {r['seconds']} |")
    print(json.dumps(rows, indent=1))
    if not a.no_append:
        append_results(f"Lean precision vs fp32 master: SmolLM2-135M QAT quality ({a.steps} steps × {a.batch}×{BLOCK} "
                       "tokens)", command("lean_quality.py", argv), lines,
                       note="same blocks, order and initial scales (gptq init); each run in its own process (peak "
                            "RSS: the whole process, ~0.7 GB of it torch + transformers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
