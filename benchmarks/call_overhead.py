"""The quantizer's fixed cost per layer call, where its kernels cost nothing: a 64×32 weight.

At small micro-batches a QAT step pays, for each of its layers (56 in the 60M Llama), one
quantizer call in forward and one in backward, and FP training pays a cast in each place. On a
tiny weight the arithmetic vanishes and what is left is that per-call cost: Python, autograd,
Dynamo's guards and wrappers around the compiled kernels. Measured here, forward + backward
through autograd, for

- ``cast``: FP training under autocast (W.to(bf16), its backward casts ∂L/∂Ŵ back to fp32);
- ``fused``: ``fake_quantize`` with the compiled kernels (``paretoq train``'s CPU default);
- ``eager``: ``fake_quantize`` with the eager kernels;
- a sketch of what the ``autograd.Function`` around the fused kernels costs: the same two kernels,
  Ŵ handed to autograd as a leaf (its gradient stored by autograd's C++ accumulator) and pushed
  through the backward kernel after ``backward()`` — what the fake-quant cache could do with one
  micro-batch per step; not a path paretoq takes (W.grad would only be filled by a flush).

``--src DIR`` (repeatable) measures other checkouts' ``src`` too (e.g. a ``git worktree`` of an
earlier commit): each source tree runs in its own child process, the children alternate round
by round, and the figure is the median over rounds of each child's best-of-batch time.

    python benchmarks/call_overhead.py [--rounds 7] [--src /tmp/old/src] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
LAYERS_60M = 56  # QuantLinear layers of the 60M Llama of qat_overhead.py (8 blocks × 7)


def child(calls: int) -> None:
    import torch

    from paretoq.quant import compiled, functional

    torch.set_num_threads(1)
    scheme = functional.SCHEMES[2]
    w = torch.nn.Parameter(torch.randn(64, 32) * 0.02)
    a = torch.nn.Parameter(functional.init_scale(w.detach(), scheme, None))
    g = torch.randn(64, 32, dtype=torch.bfloat16)

    def cast():
        w.to(torch.bfloat16).backward(g)

    def quantized():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = functional.fake_quantize(w, a, scheme, torch.bfloat16)
        out.backward(g)

    def best(fn):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        return min(times)

    def leaf():
        # a sketch, not paretoq's path: the same kernels with no autograd.Function around them. Ŵ is a
        # leaf whose gradient autograd's C++ accumulator stores; one backward call after backward.
        with torch.no_grad():
            w_hat = forward(w.detach(), a.detach(), scheme, torch.bfloat16)
        w_hat.requires_grad_()
        w_hat.backward(g)
        with torch.no_grad():
            w.grad, a.grad = backward(w.detach(), a.detach(), scheme, w_hat.grad, s_g)

    # the kernels the fused quantizer calls on CPU: built ahead (FORWARD_CPU) or, before, torch.compile'd
    forward = getattr(compiled, "FORWARD_CPU", getattr(compiled, "FORWARD", None))
    backward = getattr(compiled, "BACKWARD_CPU", getattr(compiled, "BACKWARD", None))

    s_g = torch.tensor(functional.gradient_scale(w.numel(), scheme))
    compiled.enable(True)
    for _ in range(3):
        quantized()  # compiles
    fused = best(quantized)
    figures = {"cast": best(cast), "fused": fused}
    if forward is not None:  # older checkouts (--src) have no Kernel objects
        leaf()
        figures["leaf"] = best(leaf)
    compiled.enable(False)
    print(json.dumps({**figures, "eager": best(quantized)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--src", action="append", default=[], help="another checkout's src/ to measure too")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.calls)
    from qat_overhead import append_results

    trees = [str(SRC)] + [str(Path(s).resolve()) for s in args.src]
    runs = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees[r % len(trees):] + trees[:r % len(trees)]:
            env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
            out = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)], env=env,
                                 capture_output=True, text=True, check=True)
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = ["| source | cast (FP) µs | fused µs | eager µs | fused − cast: µs per layer, ms per 60M step "
             "| sketch: fused kernels, no autograd.Function (µs) |", "|---|---|---|---|---|---|"]
    for tree, rows in runs.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        extra = med["fused"] - med["cast"]
        name = "this checkout" if tree == str(SRC) else tree
        leaf = f"{med['leaf']:.0f} (+{med['leaf'] - med['cast']:.0f} over cast)" if "leaf" in med else "—"
        lines.append(f"| {name} | {med['cast']:.0f} | {med['fused']:.0f} | {med['eager']:.0f} | "
                     f"{extra:.0f} µs, {extra * LAYERS_60M / 1e3:.1f} ms | {leaf} |")
    print("\n".join(lines))
    if not args.no_append:
        command = "python benchmarks/call_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results("Quantizer cost per layer call, 64×32 weight (call_overhead.py)", command.strip(), lines,
                       note=f"forward + backward through autograd, bf16 autocast, 2-bit per row, 1 thread; "
                            f"median over {args.rounds} rounds of the best of 5 × {args.calls} calls; "
                            "sources alternate round by round")


if __name__ == "__main__":
    main()
