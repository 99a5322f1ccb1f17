"""Whether the matrix products run slower on quantized weight values than on full-precision ones.

The same bf16 products, same shapes and layout, only the weight's values differ: FP training
multiplies by W cast to bf16, QAT by Ŵ = α̃·q(W/α̃) (a handful of levels per row or group). On
some CPUs (seen on a Xeon with AMX, 2026-12-03) a bf16 matrix product's speed depends on the
values it multiplies, which no quantizer can change: QAT must multiply by Ŵ. This script times,
for one step's worth of the 60M Llama's 56 decoder weights (``qat_overhead.py``), the products
that read the weight — forward y = x Wᵀ and backward ∂L/∂x = g W — on:

- ``cast``: W.to(bf16), what FP training multiplies by;
- ``quantized``: Ŵ in bf16 (``--quant``, scales from the reference initialisation);
- ``signs``: ±0.02 at random, no zeros (values with no structure at all, for comparison).

Kinds alternate within each round; figures are medians over rounds, ms per step.

    python benchmarks/matmul_values.py [--batch 4x512] [--quant 2:row,4:128] [--rounds 9] [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from qat_overhead import append_results, build_model, parse_quant

from paretoq.quant import QuantLinear
from paretoq.quant.functional import quantize_weight


def weights(quant) -> dict[str, list[torch.Tensor]]:
    kinds = {}
    for bits, group in quant:
        model = build_model("60m", bits, group)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        kinds.setdefault("cast", [m.weight.detach().to(torch.bfloat16) for m in layers])
        name = f"quantized {bits} bit, {'row' if group is None else f'g{group}'}"
        kinds[name] = [quantize_weight(m.weight, m.weight_clip_val, m.scheme, torch.bfloat16) for m in layers]
    gen = torch.Generator().manual_seed(1)
    kinds["signs"] = [(torch.randint(0, 2, w.shape, generator=gen) * 0.04 - 0.02).to(torch.bfloat16)
                      for w in kinds["cast"]]
    return kinds


def products(ws: list[torch.Tensor], xs: dict, gs: dict) -> float:
    t0 = time.perf_counter()
    for w in ws:
        torch.nn.functional.linear(xs[w.shape[1]], w)  # forward
        gs[w.shape[0]].mm(w)  # backward: ∂L/∂x
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="4x512")
    p.add_argument("--quant", default="2:row,4:128")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, t = (int(v) for v in args.batch.split("x"))
    tokens = b * t
    kinds = weights(parse_quant(args.quant))
    dims = {d for ws in kinds.values() for w in ws for d in w.shape}
    gen = torch.Generator().manual_seed(2)
    xs = {d: torch.randn(tokens, d, generator=gen).to(torch.bfloat16) for d in dims}
    gs = {d: (torch.randn(tokens, d, generator=gen) * 1e-3).to(torch.bfloat16) for d in dims}
    times = {k: [] for k in kinds}
    for r in range(args.rounds + 1):
        names = list(kinds)
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            s = products(kinds[k], xs, gs)
            if r:  # round 0 warms up
                times[k].append(s)
    cast = times["cast"]
    lines = ["| weight values | products per step (ms) | / cast (median over rounds) |", "|---|---:|---:|"]
    for k, v in times.items():
        ratio = statistics.median(a / c for a, c in zip(v, cast))
        lines.append(f"| {k} | {statistics.median(v) * 1e3:.1f} | {ratio:.3f} |")
    if args.no_append:
        print("\n".join(lines))
    else:
        cmd = "python benchmarks/matmul_values.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(f"Matrix products on quantized vs full-precision weight values (matmul_values.py, {args.batch})",
                       cmd, lines, note=f"bf16, {torch.get_num_threads()} thread(s), the 56 decoder weights of the 60M "
                       f"Llama, forward x Wᵀ and backward g W; {args.rounds} rounds after 1 warm-up, kinds rotated")


if __name__ == "__main__":
    main()
