"""Peak memory (RSS) of QAT training against FP training, each in its own process.

Every (model, micro-batch, precision, mode) runs ``--steps`` training steps of ``qat_overhead.py``
in a fresh child process and reports ``ru_maxrss`` (the process's peak resident set). ``fp`` is
the unquantized model (plain ``nn.Linear``); ``ours`` / ``eager`` / ``ref`` as in
``qat_overhead.py``. Every child imports ``transformers.Trainer`` first, as every transformers
training run (FP or ``paretoq train``) does: that import brings torch's compiler stack
(``torch._dynamo``, ``torch._inductor``, sympy) along, so the fused kernels' fixed cost is what
compiling adds on top. The ratio is peak RSS / FP peak RSS; both include the ~0.7 GB of imported
torch + transformers, stated with the difference in MiB so the ratio can be read without it too.
The FP peak itself moves by up to ~110 MiB from one process to the next (allocator state), so
``--repeats N`` runs N rounds of one child per mode, alternating, and reports medians with the
range of the per-round ratios.

    python benchmarks/memory.py [--model 60m] [--batch 1x256,4x512] [--precision bf16,fp32]
                                [--quant 2:row] [--modes fp,ours,eager,ref] [--ga 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from harness import add_common_args, append_results, command, parse_quant, set_threads

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    import transformers.trainer  # noqa: F401 -- what any transformers training process has loaded
    from qat_overhead import Modes, train_step, training_setup

    set_threads(args.threads)
    (bits, group), = parse_quant(args.quant)
    model, opt, batches = training_setup(args.model, None if args.mode == "fp" else bits, group, args.batch, args.ga)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    switch = Modes(cache=args.ga > 1)
    mode = "eager" if args.mode == "fp" else args.mode  # no QuantLinear in the fp model: any forward
    with switch.use(mode, model):
        for _ in range(args.steps):
            train_step(model, opt, batches, args.precision == "bf16", flush=switch.uses_cache(mode))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak, "after_build_kib": base}))


def run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *argv],
                         capture_output=True, text=True, check=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="60m")
    p.add_argument("--batch", default="1x256,4x512")
    p.add_argument("--precision", default="bf16,fp32")
    p.add_argument("--quant", default="2:row")
    p.add_argument("--modes", default="fp,ours,eager,ref")
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="rounds of one child per mode; medians reported")
    add_common_args(p, threads=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    modes = args.modes.split(",")
    assert modes[0] == "fp", "--modes must start with fp"
    build_note = ""
    if "ours" in modes:  # the CPU kernels are built before training starts, as `paretoq train` does
        from paretoq.quant import fused
        from paretoq.quant.functional import SCHEMES

        (bits, _), = parse_quant(args.quant)
        for precision in args.precision.split(","):
            kernels = fused.prebuild([SCHEMES[bits]], torch.bfloat16 if precision == "bf16" else torch.float32)
            assert kernels is not None, "the quantizer's kernels could not be built"
        built = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if built:
            build_note = f"; this run built the CPU kernels first: build child peak {built / 1024:.0f} MiB"
        print(f"kernels ready{build_note}", flush=True)
    header = ("| model | micro-batch | GA | precision | quant | FP peak RSS | "
              + " | ".join(f"{m} / FP" for m in modes[1:]) + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header, flush=True)
    for shape in args.model.split(","):
        for batch in args.batch.split(","):
            for precision in args.precision.split(","):
                common = ["--model", shape, "--batch", batch, "--precision", precision, "--quant", args.quant,
                          "--ga", str(args.ga), "--steps", str(args.steps), "--threads", str(args.threads)]
                peaks = {m: [] for m in modes}
                for _ in range(args.repeats):  # modes alternate: a slow drift of the machine hits all alike
                    for m in modes:
                        peaks[m].append(run_child([*common, "--mode", m])["peak_kib"])
                fp = statistics.median(peaks["fp"])
                cells = []
                for m in modes[1:]:
                    peak = statistics.median(peaks[m])
                    cell = f"{peak / fp:.3f} ({(peak - fp) / 1024:+.0f} MiB)"
                    if args.repeats > 1:
                        ratios = sorted(q / f for q, f in zip(peaks[m], peaks["fp"]))
                        cell += f", rounds {ratios[0]:.3f}–{ratios[-1]:.3f}"
                    cells.append(cell)
                spread = f" ({min(peaks['fp']) / 1024:.0f}–{max(peaks['fp']) / 1024:.0f})" if args.repeats > 1 else ""
                line = (f"| {shape} | {batch} | {args.ga} | {precision} | {args.quant} | {fp / 1024:.0f} MiB{spread} | "
                        + " | ".join(cells) + " |")
                lines.append(line)
                print(line, flush=True)
    if not args.no_append:
        cmd = command("memory.py", argv)
        append_results("Peak memory, QAT vs FP training (memory.py)", cmd, lines,
                       note=f"ru_maxrss of one child process per cell and round ({args.repeats} rounds, medians; "
                            f"FP's range in brackets), {args.steps} steps each (fused AdamW); "
                            f"includes the ~0.7 GiB of imported torch + transformers (incl. transformers.Trainer)"
                            f"{build_note}")


if __name__ == "__main__":
    main()
