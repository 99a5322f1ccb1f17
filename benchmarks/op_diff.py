"""Which operators a QAT step spends its extra time in: per-op self CPU time of two modes, side by side.

Same model, data, step and (fused) AdamW as ``qat_overhead.py``. The two modes (``--modes A,B``,
from ``qat_overhead.MODES``) take ``--rounds`` profiled steps each, alternating (A B, B A, ...),
after two unprofiled warm-up rounds; the table lists the operators whose mean self time per step
differs most, B − A. ``--by-shape`` splits ``aten::mm`` by its input shapes, which separates the
quantized layers' products from the (never quantized) ``lm_head``'s: an excess there is not
the quantizer's arithmetic but the step as a whole running slower.

    python benchmarks/op_diff.py --modes fp,cast --rounds 8 [--by-shape]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from qat_overhead import MODES, Modes, append_results, parse_quant, train_step, training_setup


def op_times(model, opt, batches, switch, modes, rounds: int, by_shape: bool):
    """{mode: Counter(op → mean self µs per step)}, {mode: Counter(op → mean calls per step)}."""
    times = {m: collections.Counter() for m in modes}
    calls = {m: collections.Counter() for m in modes}
    for r in range(rounds + 2):
        for mode in (modes if r % 2 else modes[::-1]):
            with switch.use(mode, model):
                if r < 2:
                    train_step(model, opt, batches, True, flush=switch.uses_cache(mode))
                    continue
                with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
                    train_step(model, opt, batches, True, flush=switch.uses_cache(mode))
            for e in prof.key_averages(group_by_input_shape=by_shape):
                key = f"{e.key} {list(e.input_shapes)}" if by_shape and e.key == "aten::mm" else e.key
                times[mode][key] += e.self_cpu_time_total / rounds
                calls[mode][key] += e.count / rounds
    return times, calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="60m")
    p.add_argument("--batch", default="1x256")
    p.add_argument("--quant", default="2:row")
    p.add_argument("--modes", default="fp,cast", help="two of " + ", ".join(MODES))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--by-shape", action="store_true", help="split aten::mm by input shapes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",")]
    if len(modes) != 2 or not all(m in MODES for m in modes):
        p.error(f"--modes takes two of {', '.join(MODES)}")
    (bits, group), = parse_quant(args.quant)
    model, opt, batches = training_setup(args.model, bits, group, args.batch, 1)
    times, calls = op_times(model, opt, batches, Modes(), modes, args.rounds, args.by_shape)
    a, b = modes
    total = {m: sum(times[m].values()) / 1e3 for m in modes}
    lines = [f"| op | {a} ms (calls) | {b} ms (calls) | {b} − {a} ms |", "|---|---:|---:|---:|",
             f"| all ops (profiled self time) | {total[a]:.1f} | {total[b]:.1f} | {total[b] - total[a]:+.1f} |"]
    keys = sorted(set(times[a]) | set(times[b]), key=lambda k: -abs(times[b][k] - times[a][k]))
    for k in keys[:args.top]:
        lines.append(f"| `{k[:70]}` | {times[a][k] / 1e3:.2f} ({calls[a][k]:.0f}) | {times[b][k] / 1e3:.2f} "
                     f"({calls[b][k]:.0f}) | {(times[b][k] - times[a][k]) / 1e3:+.2f} |")
    malloc = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith(("MALLOC_", "THP_"))) or "defaults"
    note = (f"{args.rounds} profiled steps per mode after 2 warm-up rounds, alternating; mean self time per step; "
            f"bf16 autocast, fused AdamW; allocator environment: {malloc}")
    if args.no_append:
        print("\n".join(lines))
    else:
        cmd = "python benchmarks/op_diff.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(f"Per-op time, {b} vs {a} (op_diff.py: {args.model}, {args.batch}, bf16, {args.quant})",
                       cmd, lines, note=note)


if __name__ == "__main__":
    main()
