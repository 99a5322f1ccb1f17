"""How far the fused quantizer kernels are from the memory traffic they cannot avoid.

Under bf16 autocast FP training pays, per Linear weight and step, a cast W → bf16 in forward
(reads 4 bytes per weight, writes 2) and a cast ∂L/∂Ŵ → fp32 in backward (reads 2, writes 4). The
quantizer's kernels take their place: forward reads W (and α) and writes Ŵ in bf16 — the same
bytes as the cast, the rest is arithmetic; backward must also read W (x = W/α̃ decides the mask and
the α-gradient), 4 bytes more per weight than FP's cast. This script times, on the 56 weights of
the 60M Llama of ``qat_overhead.py`` (one step's worth), through the same compiled-call path
(``paretoq.quant.kernel.Kernel``, so call overheads match):

- ``cast``: FP's cast (forward W.to(bf16); backward g.to(fp32));
- ``traffic``: a kernel moving exactly the quantizer's bytes with next to no arithmetic (forward:
  the cast again; backward: reads g and W, writes an fp32 weight gradient and a row sum);
- ``ours``: the quantizer's compiled kernels (``paretoq.quant.compiled``).

``traffic − cast`` is the cost of the bytes QAT must move on top of FP, ``ours − traffic`` the cost
of the arithmetic. Kinds alternate within each round; figures are medians over rounds, in ms per
step and ns per weight element. Outputs are kept as training keeps them (Ŵ until backward, the
gradients until the step ends), and glibc is told to keep freed memory (``mallopt``): with its
defaults every fresh multi-MB output is page-faulted in anew, which costs FP and QAT alike
(``step_phases.py`` counts the faults) but varies with the order of allocations by more than the
kernels' own cost.

    python benchmarks/kernel_traffic.py [--rounds 15] [--quant 2:row] [--threads 1] [--no-append]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import torch

from qat_overhead import append_results, build_model, parse_quant

from paretoq.quant import compiled, functional
from paretoq.quant.kernel import Kernel
from paretoq.quant.linear import QuantLinear


def _cast_forward(w, a, scheme, dtype):
    return w.to(dtype)


def _cast_backward(w, a, scheme, grad, s_g):
    return grad.to(torch.float32)


def _traffic_backward(w, a, scheme, grad, s_g):
    g = grad.to(torch.float32)  # one comparison with α per weight: the two outputs fuse into one loop, as ours
    return g * (w != a).to(torch.float32), (w * g).sum(dim=-1, keepdim=True)


KINDS = {
    "cast": (Kernel(_cast_forward), Kernel(_cast_backward)),
    "traffic": (Kernel(_cast_forward), Kernel(_traffic_backward)),
    "ours": (compiled.FORWARD, compiled.BACKWARD),
}


def weights(bits: float, group: int | None):
    """(scheme, [(W, α, g, s_g)]) for every QuantLinear of ``qat_overhead``'s 60M Llama, as the kernels see them."""
    model = build_model("60m", bits, group)
    scheme = functional.SCHEMES[bits]
    gen = torch.Generator().manual_seed(0)
    out = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            w, a = compiled._rows(m.weight, m.weight_clip_val)
            g = torch.randn(w.shape, generator=gen).to(torch.bfloat16)
            out.append((w, a, g, torch.tensor(functional.gradient_scale(m.weight.numel(), scheme))))
    return scheme, out


def step(kinds, scheme, layers) -> tuple[float, float]:
    """(forward s, backward s) of one step's worth of calls. As in training, forward outputs live
    until backward and backward outputs until the step ends, so allocation costs match training's."""
    forward, backward = kinds
    t0 = time.perf_counter()
    kept = [forward(w, a, scheme, torch.bfloat16) for w, a, _, _ in layers]
    t1 = time.perf_counter()
    grads = [backward(w, a, scheme, g, s_g) for w, a, g, s_g in layers]
    t2 = time.perf_counter()
    del kept, grads
    return t1 - t0, t2 - t1


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap and never give it back (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 31))
    except (OSError, AttributeError):
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quant", default="2:row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steady = keep_freed_memory()
    (bits, group), = parse_quant(args.quant)
    scheme, layers = weights(bits, group)
    elements = sum(w.numel() for w, *_ in layers)
    times = {(k, part): [] for k in KINDS for part in ("forward", "backward")}
    for r in range(args.rounds + 2):  # 2 warm-up rounds (the first compiles)
        order = list(KINDS) if r % 2 == 0 else list(reversed(KINDS))
        for kind in order:
            for part, t in zip(("forward", "backward"), step(KINDS[kind], scheme, layers)):
                if r >= 2:
                    times[(kind, part)].append(t)
    med = {key: statistics.median(v) for key, v in times.items()}
    lines = ["| pass | FP cast ms (ns/el) | traffic ms (ns/el) | ours ms (ns/el) "
             "| bytes QAT must add: traffic − cast | arithmetic: ours − traffic |", "|---|---|---|---|---|---|"]
    for part in ("forward", "backward"):
        c, t, o = (med[(k, part)] for k in ("cast", "traffic", "ours"))
        cells = [f"{x * 1e3:.1f} ({x / elements * 1e9:.2f})" for x in (c, t, o)]
        lines.append(f"| {part} | " + " | ".join(cells) + f" | {(t - c) * 1e3:+.1f} ms | {(o - t) * 1e3:+.1f} ms |")
    c, t, o = (1e3 * (med[(k, "forward")] + med[(k, "backward")]) for k in ("cast", "traffic", "ours"))
    lines.append(f"| step | {c:.1f} | {t:.1f} | {o:.1f} | {t - c:+.1f} ms | {o - t:+.1f} ms |")
    note = (f"{len(layers)} weights of the 60M Llama ({elements / 1e6:.1f} M elements), {args.quant}, W fp32, "
            f"Ŵ and g bf16; median of {args.rounds} rounds, kinds alternating; "
            + ("glibc keeps freed memory (mallopt)" if steady else "allocator defaults (mallopt unavailable)"))
    if args.no_append:
        print(note)
        print("\n".join(lines))
    else:
        cmd = "python benchmarks/kernel_traffic.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results("Quantizer kernels against the bytes they must move (kernel_traffic.py)", cmd, lines, note=note)


if __name__ == "__main__":
    main()
