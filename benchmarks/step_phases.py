"""Where a QAT step's extra time goes: forward, backward and optimizer, FP against QAT, side by side.

Same model, data, step and (fused) AdamW as ``qat_overhead.py`` (bf16 autocast, no gradient
accumulation); the two modes alternate step by step. For each phase: the median time of each
mode, the median over rounds of (QAT phase / FP phase), and the median count of minor page faults
(first touches of freshly mapped memory) — glibc ``malloc`` maps every block above its mmap
threshold (at most 32 MiB) afresh and unmaps it when freed, so the large logits and embedding
buffers are faulted in again every step in both modes;
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` (no mmap, no trimming) takes the faults out.

    python benchmarks/step_phases.py [--model 60m] [--batch 1x256] [--quant 2:row] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch

from qat_overhead import Modes, append_results, parse_quant, training_setup

PHASES = ("forward", "backward", "optimizer", "step")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_step(model, opt, ids) -> tuple[list[float], list[int]]:
    marks = [(time.perf_counter(), faults())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    marks.append((time.perf_counter(), faults()))
    loss.backward()
    marks.append((time.perf_counter(), faults()))
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.append((time.perf_counter(), faults()))
    seconds = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    counts = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    return seconds + [marks[-1][0] - marks[0][0]], counts + [marks[-1][1] - marks[0][1]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="60m")
    p.add_argument("--batch", default="1x256")
    p.add_argument("--quant", default="2:row")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (bits, group), = parse_quant(args.quant)
    model, opt, (ids,) = training_setup(args.model, bits, group, args.batch, 1)
    switch = Modes(cache=False)
    rec = {"fp": [], "ours": []}
    for r in range(args.rounds + 2):  # two warm-up rounds (compiling, AdamW state, allocator)
        for mode in (("fp", "ours") if r % 2 else ("ours", "fp")):
            with switch.use(mode, model):
                result = timed_step(model, opt, ids)
            if r >= 2:
                rec[mode].append(result)
    lines = ["| phase | FP (s) | QAT (s) | QAT − FP (ms) | median QAT / FP | page faults FP / QAT |",
             "|---|---|---|---|---|---|"]
    for i, phase in enumerate(PHASES):
        fp = [s[i] for s, _ in rec["fp"]]
        qat = [s[i] for s, _ in rec["ours"]]
        ratio = statistics.median(b / a for a, b in zip(fp, qat))
        f_fp = statistics.median(c[i] for _, c in rec["fp"])
        f_qat = statistics.median(c[i] for _, c in rec["ours"])
        lines.append(f"| {phase} | {statistics.median(fp):.4f} | {statistics.median(qat):.4f} | "
                     f"{(statistics.median(qat) - statistics.median(fp)) * 1e3:+.1f} | {ratio:.3f} | "
                     f"{f_fp:.0f} / {f_qat:.0f} |")
    malloc = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "glibc defaults"
    if args.no_append:
        print("\n".join(lines))
    else:
        cmd = "python benchmarks/step_phases.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(f"QAT step by phase vs FP (step_phases.py: {args.model}, {args.batch}, bf16, {args.quant})",
                       cmd, lines, note=f"AdamW fused; {args.rounds} rounds after 2 warm-up; malloc: {malloc}")


if __name__ == "__main__":
    main()
