"""QAT step time against full-precision training, measured side by side in one process.

One Llama-architecture model per (shape, quantization): the same model and AdamW take steps in
rotating order in each mode, so every ratio compares steps taken a few seconds apart:

- ``fp``     — plain ``F.linear(x, W)`` in every quantized layer (what ``nn.Linear`` does);
- ``ours``   — what ``paretoq train`` does by default: ``QuantLinear`` with the fused quantizer
  kernels (``--compile_quantizer auto``: built ahead of time on CPU, during warm-up; the Triton
  kernels of ``paretoq.quant.triton_kernels`` on CUDA — the calls per path are printed), and Ŵ computed once
  per optimizer step (the fake-quant cache) where ``QATTrainer`` turns that on: GA > 1 or
  activation checkpointing;
- ``eager``  — the same with ``--compile_quantizer false`` (the eager quantizer);
- ``ours_nocache`` / ``eager_nocache`` — the two without the fake-quant cache (Ŵ every forward);
- ``cast``   — a stand-in for the quantizer that only casts, W → bf16 forward and ∂L/∂Ŵ → fp32 backward
  (∂L/∂α = 0), through an ``autograd.Function`` as ``ours`` does: the scales' bookkeeping (one
  more autograd node per layer, their gradients and AdamW entries) without the kernels' arithmetic,
  so ``ours`` − ``cast`` is what the kernels cost inside a step and ``cast`` − ``fp`` the rest;
- ``fp2``    — a second ``fp``: with ``--processes`` / ``--timeslice`` its own process, an A/A check of
  the method (its ratio to ``fp`` should be 1 within the interval);
- ``ref``    — the reference quantizer (torchao 0.18's ParetoQ prototype, loaded from ``.oracle/``)
  in the reference's ``QuantizeLinear.forward``; for group scales the weight is viewed as
  (m·G, g) rows, which is the same math.

Shapes: ``60m`` (hidden 512, 8 layers, intermediate 1408 — 11·128, so group 128 divides it —, vocab 32000: 59M parameters),
``smollm2`` (SmolLM2-135M: hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab 49152,
tied), ``minicpm4-0.5b`` (MiniCPM4-0.5B's matrices in a Llama: hidden 1024, 24 layers, 16/2 heads,
intermediate 4096, vocab 73448, tied; for GPUs) and ``tiny`` (dry runs), random weights. A step = forward/backward of ``--ga`` micro-batches, (flush), AdamW step,
zero_grad — the Trainer's sequence, with the AdamW ``paretoq train`` gets: transformers' default
``adamw_torch_fused`` on torch ≥ 2.8 (``--adamw for-loop``, PyTorch's own default on CPU, runs
~12 small ops per parameter tensor: it takes ~0.33 s longer per 60M step and charges QAT
+13 ms for its 56 scale tensors). Figures: median wall time and median process CPU time over
``--steps`` steps after ``--warmup``; each ratio comes with the 95% confidence interval of its
median (order statistics of the per-round ratios), since on a busy VM one step can run 1.5×
slower than the next for reasons outside the process (its CPU time inflates as well). The threads
default to 1 (with 2 threads every parallel op waits on a preempted partner thread).
``--parts`` (bf16) adds a figure that such drifts hardly touch: the quantizer's own forward and
backward over every layer against the casts FP training makes in their place, alternated every
~0.1 s — the part of the overhead the kernels account for.
``--processes`` runs each mode in its own child process instead, all pinned to one core and taking
turns step by step as above: the modes then share no heap. In one process FP's and QAT's steps
allocate from the same glibc heap, whose settings moved FP's own step by 20% (Intel Xeon VM,
2026-12-03; RESULTS.md's git history), so one mode's freed blocks may speed or slow the other's;
there, ``fp`` is also a plain model (``nn.Linear`` everywhere, no scales at all), which is what a
user compares with.
``--timeslice`` runs those processes at the same time on the one core, each round's steps started
together: the kernel's scheduler interleaves them every few milliseconds, so whatever slows the
machine for a second slows both alike, and each step's process CPU time is its own work. On this
VM a step's time wanders by ±10% from one step to the next whatever runs, which the alternation
above can only average out over many steps; two FP processes time-sliced so (an A/A check)
agree step by step within ~1–2%. The figures are then process CPU times (the modes split the wall
time).
A process's CPU time includes the kernel's time to fault in the pages glibc has handed back to it:
at 4×512 (SmolLM2 shape) ~0.9 million minor faults and ~14% of the step, in FP and QAT alike,
and from one step to the next either ~0.6 or ~1.0 million. ``--faults`` adds what sets the work
apart from that: each mode's user-CPU-time ratio to FP (its own interval), and every mode's
system-time share and minor faults per step. ``--malloc keep`` makes every mode's glibc keep its
blocks (no ``mmap``, no trimming), so that no step faults at all (``keep_heap``).

    python benchmarks/qat_overhead.py                                  # 60m, full matrix
    python benchmarks/qat_overhead.py --model smollm2 --precision bf16 --quant 2:row,4:64  # 576 = 9·64
    python benchmarks/qat_overhead.py --batch 1x256 --ga 8 --modes fp,ours,eager,ours_nocache,ref
    python benchmarks/qat_overhead.py --device cuda --model minicpm4-0.5b --batch 1x2048,4x2048 --precision bf16 --quant 2:row,4:128 --modes fp,ours,eager --steps 21 --warmup 3  # GPU (gpu_check.py)
    python benchmarks/qat_overhead.py --batch 4x512 --precision bf16 --quant 2:row --modes fp,ours --steps 41 --parts
    python benchmarks/qat_overhead.py --batch 4x512 --precision bf16 --quant 2:row --modes fp,ours --steps 41 --processes
    python benchmarks/qat_overhead.py --batch 4x512 --precision bf16 --quant 2:row --modes fp,ours --steps 21 --timeslice
    python benchmarks/qat_overhead.py --batch 4x512 --precision bf16 --quant 2:row --modes fp,ours --steps 21 --timeslice --faults [--malloc keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from harness import (ORACLE, REF_CODE, add_common_args, append_results, clock, command, load_reference, median_cell,
                     parse_quant, set_threads)

SHAPES = {
    "60m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # MiniCPM4-0.5B's shapes (SPEC §3) in a Llama: the same matrices; MiniCPM's scalar multipliers
    # (embedding, residual, logits) are a few elementwise ops, left out
    "minicpm4-0.5b": dict(vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # dry runs
                 num_attention_heads=4, num_key_value_heads=2),
}
MODES = ("fp", "ours", "eager", "ours_nocache", "eager_nocache", "cast", "ref", "fp2")
PLAIN = ("fp", "fp2")  # modes that train the model as it is


def build_model(shape: str, bits: float | None, group_size: int | None, seed: int = 0, device: str = "cpu"):
    """A random fp32 Llama of ``shape`` on ``device``, its decoder projections swapped for QuantLinear
    (bits not None; the scales initialised there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from paretoq import QuantConfig, quantize_model

    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=2048, **SHAPES[shape])
    if device == "cpu":
        model = LlamaForCausalLM(cfg).train()
    else:  # initialised where it trains (a 0.5B model's CPU init takes longer than its benchmark)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).train()
    if bits is not None:
        quantize_model(model, QuantConfig(w_bits=bits, group_size=group_size))
    return model


def reference_forward(ref):
    """QuantizeLinear.forward of the reference, on a QuantLinear (group scales as rows of g)."""

    def forward(self, x):
        code = REF_CODE[self.quant_config.w_bits]
        fn = ref.StretchedElasticQuant if code in (0, 2) else ref.LsqBinaryTernaryExtension
        m, n = self.weight.shape
        groups = self.weight_clip_val.shape[1]
        w = fn.apply(self.weight.reshape(m * groups, n // groups), self.weight_clip_val.reshape(m * groups, 1),
                     code, False)
        return F.linear(x, w.reshape(m, n).to(x.dtype), self.bias)

    return forward


def fp_forward(self, x):
    return F.linear(x, self.weight, self.bias)


class CastStandIn(torch.autograd.Function):
    """Ŵ = W cast to the compute dtype; ∂L/∂W = ∂L/∂Ŵ in fp32, ∂L/∂α = 0: FakeQuantize's shape, FP's arithmetic."""

    @staticmethod
    def forward(ctx, weight, scale, dtype):
        ctx.scale_shape = scale.shape
        return weight.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.float32), grad.new_zeros(ctx.scale_shape, dtype=torch.float32), None


def cast_forward(self, x):
    from paretoq.quant.linear import compute_dtype

    return F.linear(x, CastStandIn.apply(self.weight, self.weight_clip_val, compute_dtype(x)), self.bias)


class Modes:
    """Switches every QuantLinear of the process between the measured forwards.

    ``cache`` is QATTrainer's rule for the fake-quant cache (GA > 1 or activation checkpointing);
    the ``_nocache`` modes ignore it. ``uses_cache(mode)`` tells ``train_step`` whether to flush."""

    def __init__(self, cache: bool = False):
        from paretoq.quant.linear import QuantLinear

        self.cls = QuantLinear
        self.cache = cache
        self.forwards = {m: QuantLinear.forward for m in MODES if m not in ("cast", "ref", *PLAIN)}
        self.forwards.update({m: fp_forward for m in PLAIN})
        self.forwards["cast"] = cast_forward
        if ORACLE.is_file():
            self.forwards["ref"] = reference_forward(load_reference())

    def uses_cache(self, mode: str) -> bool:
        return self.cache and mode in ("ours", "eager")

    @contextlib.contextmanager
    def use(self, mode: str, model):
        from paretoq.quant import FusedKernels, set_kernels
        from paretoq.quant.linear import set_fake_quant_cache

        original = self.cls.forward
        self.cls.forward = self.forwards[mode]
        set_fake_quant_cache(model, self.uses_cache(mode))
        if mode.startswith("ours"):
            self.fused = getattr(self, "fused", None) or FusedKernels()
            set_kernels(model, self.fused)
        try:
            yield
        finally:
            set_fake_quant_cache(model, False)
            set_kernels(model, "eager")
            self.cls.forward = original


def train_step(model, opt, micro_batches, bf16: bool, flush: bool) -> None:
    from paretoq.quant.linear import flush_fake_quant_grads

    device = micro_batches[0].device.type
    for ids in micro_batches:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss / len(micro_batches)
        loss.backward()
    if flush:
        flush_fake_quant_grads(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":  # the step's kernels finished: its time is the GPU's too
        torch.cuda.synchronize()


ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
"""AdamW implementations: ``fused`` is what ``paretoq train`` runs (transformers' default optimizer,
``adamw_torch_fused``, on torch ≥ 2.8); ``for-loop`` and ``foreach`` are PyTorch's own defaults on
CPU and on GPU."""


def make_optimizer(model, adamw: str = "fused") -> torch.optim.Optimizer:
    """AdamW over every parameter (the scales get no gradient in FP mode, so it skips them there)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, **ADAMW[adamw])


def training_setup(shape: str, bits, group_size, batch: str, ga: int, adamw: str = "fused", device: str = "cpu"):
    """(model, AdamW, micro-batches): what every benchmark here trains with."""
    model = build_model(shape, bits, group_size, device=device)
    return model, make_optimizer(model, adamw), make_batches(model.config.vocab_size, batch, ga, device=device)


def make_batches(vocab: int, batch: str, ga: int, seed: int = 0, device: str = "cpu"):
    b, t = (int(v) for v in batch.split("x"))
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, t), generator=gen).to(device) for _ in range(ga)]


def measure(shape, bits, group_size, batch, bf16, ga, modes, steps, warmup, checkpointing=False, parts=False,
            adamw="fused", device="cpu"):
    """Median step times {mode: (wall s, cpu s)}, ratios {mode: RoundRatios} to the FP step and,
    with ``parts`` (bf16 only), {mode: quantizer_parts ms} for the paretoq modes; on a GPU, the last
    entry of that dict is {mode: peak GPU memory of its steps, bytes} under ``"peak"``.

    The modes' steps are interleaved round by round; a ratio is the median over rounds of
    (mode step / FP step of the same round), which follows the machine's load as it drifts.
    """
    model, opt, batches = training_setup(shape, bits, group_size, batch, ga, adamw, device)
    cuda = device == "cuda"
    peak = {m: 0 for m in modes}
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    switch = Modes(cache=ga > 1 or checkpointing)
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for r in range(warmup + steps):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no mode always runs first
        for mode in order:
            with switch.use(mode, model):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0, c0 = clock()
                train_step(model, opt, batches, bf16, flush=switch.uses_cache(mode))
                t1, c1 = clock()
                if cuda:
                    peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated())
            if r >= warmup:
                wall[mode].append(t1 - t0)
                cpu[mode].append(c1 - c0)
    extra = {m: quantizer_parts(model, switch, m) for m in modes if parts and bf16 and m in ("ours", "eager")}
    if cuda:
        extra["peak"] = peak
    if getattr(switch, "fused", None) is not None:  # which way the fused quantizer's calls went
        extra["calls"] = dict(switch.fused.calls)
    del model, opt
    return (*summarise(wall, cpu), extra)


def summarise(wall: dict, cpu: dict):
    """Median step times {mode: (wall s, cpu s)} and per-round ratios {mode: RoundRatios} to ``fp``."""
    times = {m: (statistics.median(wall[m]), statistics.median(cpu[m])) for m in wall}
    ratios = {m: RoundRatios([s / b for s, b in zip(wall[m], wall["fp"])], [s / b for s, b in zip(cpu[m], cpu["fp"])])
              for m in wall}
    return times, ratios


def keep_heap() -> None:
    """glibc malloc in this process from now on: every block from the heap (no ``mmap``), and the heap
    never trimmed — freed memory stays mapped for the next step instead of being returned to the
    kernel and faulted in again, page by page (``--malloc keep``)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("mallopt failed")


def usage() -> tuple[float, float, int]:
    """This process's (system CPU s, user CPU s, minor page faults) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_stime, r.ru_utime, r.ru_minflt


def _mode_server(conn, shape, bits, group_size, batch, bf16, ga, mode, threads, adamw, cpu, checkpointing,
                 malloc="default"):
    """One mode's training in a child process (``--processes``): one timed step per ``"step"``
    received, answered with (wall s, cpu s, (system s, user s, minor faults)); ``"parts"`` answers
    quantizer_parts; ``"quit"`` ends."""
    if malloc == "keep":
        keep_heap()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(threads)
    model, opt, batches = training_setup(shape, None if mode in PLAIN else bits, group_size, batch, ga, adamw)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    switch = Modes(cache=ga > 1 or checkpointing)
    flush = switch.uses_cache(mode)
    with contextlib.ExitStack() as stack:
        if mode not in PLAIN:  # fp: the plain model, nothing to switch
            stack.enter_context(switch.use(mode, model))
        conn.send("ready")
        while (cmd := conn.recv()) != "quit":
            if cmd == "step":
                (t0, c0), u0 = clock(), usage()
                train_step(model, opt, batches, bf16, flush)
                (t1, c1), u1 = clock(), usage()
                conn.send((t1 - t0, c1 - c0, tuple(b - a for a, b in zip(u0, u1))))
            elif cmd == "parts":
                conn.send(quantizer_parts(model, switch, mode))
    conn.close()


def measure_processes(shape, bits, group_size, batch, bf16, ga, modes, steps, warmup, checkpointing=False,
                      parts=False, adamw="fused", threads=1, cpu=None, timeslice=False, malloc="default"):
    """``measure`` with one child process per mode (same model seed, batches and AdamW), all pinned to
    core ``cpu`` (default: the last this process may use), stepping in rotating order — or, with
    ``timeslice``, all at once, each round waiting for every mode's step; the wall figures are then
    the process CPU times as well. The last value returned is {mode: [(system s, user s, minor faults)
    per measured step]}."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cpu = max(os.sched_getaffinity(0)) if cpu is None else cpu
    children = {}
    try:
        for mode in modes:  # one at a time, so building one model does not slow another's
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_mode_server, args=(child, shape, bits, group_size, batch, bf16, ga, mode,
                                                          threads, adamw, cpu, checkpointing, malloc),
                                   daemon=True)
            proc.start()
            children[mode] = (proc, parent)
            if parent.recv() != "ready":
                raise RuntimeError(f"{mode} child did not start")
        wall = {m: [] for m in modes}
        cpu_s = {m: [] for m in modes}
        rusage = {m: [] for m in modes}
        for r in range(warmup + steps):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            if timeslice:
                for mode in order:
                    children[mode][1].send("step")
                taken = {mode: children[mode][1].recv() for mode in order}
                taken = {mode: (c, c, k) for mode, (_, c, k) in taken.items()}
            else:
                taken = {}
                for mode in order:
                    children[mode][1].send("step")
                    taken[mode] = children[mode][1].recv()
            if r >= warmup:
                for mode, (w, c, k) in taken.items():
                    wall[mode].append(w)
                    cpu_s[mode].append(c)
                    rusage[mode].append(k)
        extra = {}
        for m in modes:
            if parts and bf16 and m in ("ours", "eager"):
                children[m][1].send("parts")
                extra[m] = children[m][1].recv()
    finally:
        for proc, conn in children.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send("quit")
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return (*summarise(wall, cpu_s), extra, rusage)


def quantizer_parts(model, switch, mode: str, reps: int = 21) -> float:
    """Median extra milliseconds per step of ``mode``'s quantizer over FP training's casts, with no
    matrix products around them: the forward (Ŵ in bf16) and backward (∂L/∂W, ∂L/∂α from a bf16
    ∂L/∂Ŵ) of every QuantLinear, as one step calls them, against the fp32→bf16 cast of each W and
    bf16→fp32 cast of each gradient that FP training under bf16 autocast makes in their place.
    The two alternate every ~0.1 s, so the machine's slow drifts (which blur whole steps measured
    seconds apart) cancel; it leaves out the autograd and optimizer bookkeeping of the scales."""
    from paretoq.quant import functional
    from paretoq.quant.linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(m.weight.shape, generator=gen).mul_(1e-3).bfloat16() for m in layers]

    def quantizer():
        for m in layers:
            functional.quantize_weight(m.weight, m.weight_clip_val, m.scheme, torch.bfloat16, kernels=m.kernels)
        for m, g in zip(layers, grads):
            functional.quantize_backward(m.weight, m.weight_clip_val, m.scheme, g, kernels=m.kernels)

    def casts():
        for m in layers:
            m.weight.detach().to(torch.bfloat16)
        for g in grads:
            g.to(torch.float32)

    extra = []
    with switch.use(mode, model):
        for r in range(reps + 2):  # two warm-up rounds; the order alternates
            seconds = {}
            for fn in ((quantizer, casts) if r % 2 else (casts, quantizer)):
                t0 = time.perf_counter()
                fn()
                seconds[fn] = time.perf_counter() - t0
            if r >= 2:
                extra.append(seconds[quantizer] - seconds[casts])
    return statistics.median(extra) * 1e3


class RoundRatios:
    """The per-round ratios (mode step / FP step of the same round), wall and CPU time."""

    def __init__(self, wall: list[float], cpu: list[float]):
        self.wall, self.cpu = wall, cpu

    def cell(self) -> str:
        return f"{median_cell(self.wall)}, {statistics.median(self.cpu):.3f}"


def fault_cells(rusage: dict, modes: list[str]) -> list[str]:
    """``--faults`` cells: per non-FP mode the median over rounds of (its user CPU time / FP's) [95% CI],
    then one cell with every mode's median system-time share of its step and minor faults per step."""
    user = {m: [u for _, u, _ in rusage[m]] for m in modes}
    cells = [median_cell([a / b for a, b in zip(user[m], user["fp"])]) for m in modes[1:]]
    share = " · ".join(f"{m} {statistics.median(s / (s + u) for s, u, _ in rusage[m]):.1%}, "
                       f"{statistics.median(f for _, _, f in rusage[m]) / 1e3:.0f}k" for m in modes)
    return [*cells, share]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="60m", help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--batch", default="1x256,4x512", help="micro-batch sizes, BxT, comma list")
    p.add_argument("--precision", default="bf16,fp32", help="bf16 (autocast) and/or fp32")
    p.add_argument("--quant", default="2:row,2:128,4:row,4:128", help="bits:group (row = per-row scales)")
    p.add_argument("--modes", default="fp,ours,ref", help="comma list of " + ", ".join(MODES))
    p.add_argument("--ga", type=int, default=1, help="gradient accumulation steps (micro-batches per step)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    add_common_args(p, threads=1)
    p.add_argument("--adamw", choices=list(ADAMW), default="fused",
                   help="AdamW implementation (fused: what paretoq train runs)")
    p.add_argument("--parts", action="store_true",
                   help="bf16: also time the quantizer's kernels per step against FP's casts (quantizer_parts)")
    p.add_argument("--processes", action="store_true",
                   help="one child process per mode, pinned to one core, taking turns (the modes share no heap)")
    p.add_argument("--cpu", type=int, default=None, help="--processes: the core to pin to (default: the last)")
    p.add_argument("--timeslice", action="store_true",
                   help="--processes, with the modes' steps run at the same time on the one core (CPU-time figures)")
    p.add_argument("--malloc", choices=("default", "keep"), default="default",
                   help="glibc malloc as it comes, or keep: no mmap, no trimming, in every mode (keep_heap)")
    p.add_argument("--faults", action="store_true",
                   help="--processes/--timeslice: also each mode's user-time ratio, system-time share and "
                        "minor page faults per step")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: models and batches on the GPU, bf16 autocast there, each step timed to its "
                        "last kernel; adds each mode's peak GPU memory")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and (args.processes or args.timeslice or args.parts or args.malloc != "default"):
        p.error("--device cuda runs the modes in one process: no --processes, --timeslice, --parts or --malloc")
    if args.faults and not (args.processes or args.timeslice):
        p.error("--faults needs --processes or --timeslice")
    if args.malloc == "keep" and not (args.processes or args.timeslice):
        keep_heap()
    set_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",")]
    assert modes[0] == "fp" and all(m in MODES for m in modes), f"--modes must start with fp, from {MODES}"
    part_modes = [m for m in modes if args.parts and m in ("ours", "eager")]
    clock = "cpu" if args.timeslice else "wall"  # time-sliced processes share the wall clock
    header = (f"| model | micro-batch | GA | precision | quant | FP step ({clock} / cpu) | "
              + " | ".join(f"{m} / FP ({clock} [95% CI], cpu)" for m in modes[1:])
              + "".join(f" | {m}: quantizer − casts per step" for m in part_modes)
              + ("".join(f" | {m} / FP (user time [95% CI])" for m in modes[1:])
                 + " | system time share, minor faults per step" if args.faults else "")
              + (" | peak GPU memory: FP; " + ", ".join(f"{m} / FP" for m in modes[1:]) if cuda else "") + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print(header, flush=True)
    for shape in args.model.split(","):
        for batch in args.batch.split(","):
            for precision in args.precision.split(","):
                for bits, group in parse_quant(args.quant):
                    if args.processes or args.timeslice:
                        times, ratios, extra, rusage = measure_processes(
                            shape, bits, group, batch, precision == "bf16", args.ga, modes, args.steps, args.warmup,
                            args.checkpointing, args.parts, args.adamw, args.threads, args.cpu, args.timeslice,
                            args.malloc)
                    else:
                        times, ratios, extra = measure(shape, bits, group, batch, precision == "bf16", args.ga, modes,
                                                       args.steps, args.warmup, args.checkpointing, args.parts,
                                                       args.adamw, args.device)
                    fw, fc = times["fp"]
                    cells = [ratios[m].cell() for m in modes[1:]]
                    cells += [f"{extra[m]:+.1f} ms ({extra[m] / 1e3 / fw:+.2%})" if m in extra else "—"
                              for m in part_modes]
                    if args.faults:
                        cells += fault_cells(rusage, modes)
                    if cuda:
                        peak = extra["peak"]
                        cells.append(f"{peak['fp'] / 2**20:.0f} MiB; "
                                     + ", ".join(f"{peak[m] / peak['fp']:.3f}" for m in modes[1:]))
                    if "calls" in extra:
                        print(f"  fused quantizer calls by path ({shape}, {batch}, {precision}, {bits} bit, "
                              f"{'row' if group is None else f'g{group}'}): {extra['calls']}", flush=True)
                    line = (f"| {shape} | {batch} | {args.ga} | {precision} | {bits} bit, "
                            f"{'row' if group is None else f'g{group}'} | {fw:.3f} s / {fc:.3f} s | "
                            + " | ".join(cells) + " |")
                    lines.append(line)
                    print(line, flush=True)
    if not args.no_append:
        cmd = command("qat_overhead.py", argv)
        core = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
        append_results("QAT step time vs FP (qat_overhead.py)", cmd, lines,
                       note=f"AdamW {args.adamw}; {args.steps} steps per mode after {args.warmup} warm-up, modes "
                            f"interleaved round by round"
                            + (f"; on {torch.cuda.get_device_name()} (each step timed to its last kernel with "
                               f"`torch.cuda.synchronize`; peak GPU memory: the largest "
                               f"`torch.cuda.max_memory_allocated` over a mode's steps, model and AdamW state "
                               f"included)" if cuda else "")
                            + (f", each mode in its own process pinned to core {core} (fp: a plain model)"
                               if args.processes or args.timeslice else " in one process")
                            + (", the processes' steps run at the same time, time-sliced by the scheduler: every "
                               "figure is process CPU time" if args.timeslice else "")
                            + "; FP = median step time; ratio = median over rounds of "
                            "(mode step / FP step), "
                            "[95% confidence interval of that median, from the order statistics]"
                            + ("; quantizer − casts: median over 21 alternations of (every layer's quantizer forward "
                               "+ backward − FP's weight and gradient casts), and that as a share of the FP step"
                               if part_modes else "")
                            + ("; activation checkpointing" if args.checkpointing else "")
                            + ("; glibc malloc kept every block on its heap and never trimmed it (`mallopt`: "
                               "M_MMAP_MAX 0, M_TRIM_THRESHOLD 2³¹−1), in every mode" if args.malloc == "keep" else "")
                            + ("; user time: median over rounds of (mode's user CPU time / FP's); system time "
                               "share: median of (system / (user + system)) per step; minor faults: median per "
                               "step (from getrusage)" if args.faults else ""))


if __name__ == "__main__":
    main()
