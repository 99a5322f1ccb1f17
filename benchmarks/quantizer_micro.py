"""Forward + backward of the quantizer alone: paretoq against the reference, same outputs.

One 4096×1024 and one 1024×4096 fp32 weight, per-row scales (the reference's layout), every bit
width; g = ∂L/∂Ŵ in fp32 (``--grad bf16``: a bf16 g, as under autocast, where the reference gets
it cast to fp32 and paretoq reads the bf16 directly). Each repetition runs the reference and
paretoq back to back on fresh leaf tensors (order alternating) and asserts that Ŵ, ∂L/∂W and
∂L/∂α are bit-identical (``torch.equal``). ``fused`` is the same quantizer through the compiled
kernels (``paretoq.quant.fused``, the CPU default of ``paretoq train``): Ŵ and ∂L/∂W asserted
bit-identical too, ∂L/∂α equal to summation order (rtol 2e-6). Figures: median wall and
process-CPU time. ``--device cuda``: the same on the GPU (each run timed to its last kernel); the
fused kernels are then Triton's (``torch.compile``), and instead of asserting, the ``equal``
column counts the elements of Ŵ and ∂L/∂W that differ from the reference's.

    python benchmarks/quantizer_micro.py [--reps 9] [--threads 1] [--grad fp32|bf16] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from harness import REF_CODE, add_common_args, append_results, clock, command, load_reference, set_threads

from paretoq.quant.functional import SCHEMES, fake_quantize, init_scale
from paretoq.quant.fused import FusedKernels

SHAPES = [(4096, 1024), (1024, 4096)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--grad", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    add_common_args(p, threads=1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    ref = load_reference()
    cuda = args.device == "cuda"

    def run_ref(bits, W, A, G):
        fn = ref.StretchedElasticQuant if REF_CODE[bits] in (0, 2) else ref.LsqBinaryTernaryExtension
        w, a = W.clone().requires_grad_(), A.clone().requires_grad_()
        t0, c0 = clock(cuda)
        out = fn.apply(w, a, REF_CODE[bits], False).to(G.dtype)  # QuantizeLinear's .to(input dtype)
        out.backward(G)  # a bf16 g arrives cast to fp32
        t1, c1 = clock(cuda)
        return (t1 - t0, c1 - c0), (out.detach(), w.grad, a.grad)

    def run_ours(bits, W, A, G, kernels=None):
        w, a = W.clone().requires_grad_(), A.clone().requires_grad_()
        t0, c0 = clock(cuda)
        out = fake_quantize(w, a, SCHEMES[bits], G.dtype, kernels)
        out.backward(G)
        t1, c1 = clock(cuda)
        return (t1 - t0, c1 - c0), (out.detach(), w.grad, a.grad)

    fused = FusedKernels()

    def run_fused(bits, W, A, G):
        return run_ours(bits, W, A, G, fused)

    header = ("| weight | bits | reference fwd+bwd (wall / cpu) | paretoq eager (wall / cpu) | paretoq fused (wall / cpu) "
              "| speed-up eager (wall, cpu) | speed-up fused (wall, cpu) | equal |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    for shape in SHAPES:
        torch.manual_seed(0)
        W = (torch.randn(*shape) * 0.02).to(args.device)
        G = torch.randn(*shape).to(args.device, torch.bfloat16 if args.grad == "bf16" else torch.float32)
        for bits in SCHEMES:
            A = init_scale(W, SCHEMES[bits], None) * torch.empty(shape[0], 1).uniform_(0.5, 1.5).to(args.device)
            times = {"ref": [], "ours": [], "fused": []}
            differ = [0, 0, 0, 0]  # elements of Ŵ, ∂L/∂W differing from the reference (eager, fused), last repetition
            for r in range(args.reps + 1):
                trio = [("ref", run_ref), ("ours", run_ours), ("fused", run_fused)]
                results = {}
                for name, fn in trio[r % 3:] + trio[:r % 3]:  # rotate the order
                    t, results[name] = fn(bits, W, A, G)
                    if r:  # the first repetition is warm-up (and compiles the fused kernels)
                        times[name].append(t)
                expected, got, fast = results["ref"], results["ours"], results["fused"]
                if cuda:  # counted, not asserted
                    differ = [int((x != y).sum()) for ours in (got, fast) for x, y in zip(expected[:2], ours[:2])]
                    continue
                assert all(torch.equal(x, y) for x, y in zip(expected, got)), (shape, bits)
                assert torch.equal(expected[0], fast[0]) and torch.equal(expected[1], fast[1]), (shape, bits)
                torch.testing.assert_close(fast[2], expected[2], rtol=2e-6, atol=2e-6 * float(expected[2].abs().max()))
            med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
            (rw, rc), (ow, oc), (fw, fc) = med["ref"], med["ours"], med["fused"]
            line = (f"| {shape[0]}×{shape[1]} | {bits} | {rw * 1e3:.1f} / {rc * 1e3:.1f} ms | {ow * 1e3:.1f} / "
                    f"{oc * 1e3:.1f} ms | {fw * 1e3:.1f} / {fc * 1e3:.1f} ms | {rw / ow:.2f}×, {rc / oc:.2f}× | "
                    f"{rw / fw:.2f}×, {rc / fc:.2f}× | "
                    + ("yes |" if not cuda else f"Ŵ, ∂L/∂W elements differing: eager {differ[0]}, {differ[1]}; "
                                                f"fused {differ[2]}, {differ[3]} |"))
            lines.append(line)
            print(line, flush=True)
    if not args.no_append:
        cmd = command("quantizer_micro.py", argv)
        note = (f"median of {args.reps} repetitions after 1 warm-up, alternating order; "
                + ("Ŵ, ∂L/∂W, ∂L/∂α asserted bit-identical (torch.equal) in every repetition "
                   "(fused: ∂L/∂α to summation order, rtol 2e-6)" if not cuda else
                   f"on {torch.cuda.get_device_name()}, each run timed to its last kernel; differing elements "
                   "counted in the last repetition"))
        append_results(f"Quantizer forward+backward, paretoq vs reference (quantizer_micro.py, g in {args.grad}"
                       + (", CUDA" if cuda else "") + ")", cmd, lines, note=note)


if __name__ == "__main__":
    main()
