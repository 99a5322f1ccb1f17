"""torch.profiler of one QAT training step (after warm-up); the top ops by self CPU time.

Same model, data, step and (fused) AdamW as ``qat_overhead.py``; the FP step is profiled too so
the two tables can be read against each other. Appends both top-N tables to ``benchmarks/RESULTS.md``.

    python benchmarks/profile_step.py [--model 60m] [--batch 1x256] [--precision bf16] [--quant 2:row]
                                      [--mode ours|eager|ref] [--ga 1] [--top 10]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from qat_overhead import Modes, append_results, parse_quant, train_step, training_setup


def profile_mode(model, opt, batches, bf16, switch, mode, top):
    with switch.use(mode, model):
        for _ in range(2):  # warm-up (AdamW state, allocator, compiling)
            train_step(model, opt, batches, bf16, flush=switch.uses_cache(mode))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, opt, batches, bf16, flush=switch.uses_cache(mode))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="60m")
    p.add_argument("--batch", default="1x256")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--quant", default="2:row")
    p.add_argument("--mode", default="ours")
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (bits, group), = parse_quant(args.quant)
    model, opt, batches = training_setup(args.model, bits, group, args.batch, args.ga)
    switch = Modes(cache=args.ga > 1)
    bf16 = args.precision == "bf16"
    tables = {mode: profile_mode(model, opt, batches, bf16, switch, mode, args.top) for mode in ("fp", args.mode)}
    lines = []
    for mode, table in tables.items():
        lines += [f"{mode} step, top {args.top} ops by self CPU time:", "", "```", table.rstrip(), "```", ""]
    if args.no_append:
        print("\n".join(lines))
    else:
        cmd = "python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(f"Profile of one QAT step (profile_step.py: {args.model}, {args.batch}, {args.precision}, "
                       f"{args.quant}, {args.mode})", cmd, lines)


if __name__ == "__main__":
    main()
