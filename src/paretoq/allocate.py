"""``paretoq allocate``: per-layer bit widths chosen from data under a size budget (mixed precision).

Three steps:

1. **Candidates and their bytes.** Each quantizable layer (the default selection: the Linear layers
   of the decoder blocks) may take one of the candidates (bits, group): by default 1.58, 2, 3 and
   4 bits, each with per-row scales and with one scale per 64 weights (``--candidates
   2,3,4,3:64,16``: ``B:G`` = group size G, 16 = the layer left in bf16). A grouped candidate whose
   group does not divide a layer's in_features is not offered to that layer. A candidate's cost is the bytes a packed export stores for the layer:
   the codes in their packing format (ternary as base-3, 5 codes per byte = 1.6 bits; write the
   packed folder with ``ternary_format="base3"`` to get those bytes) plus one fp16 scale per row
   or group; 16 = bf16 weights. "Bits per weight" below is always 8 · those bytes / weights,
   averaged over the quantizable layers — the scales are included, the embeddings, norms and LM
   head are not (they are not quantized).

2. **Sensitivity** (``measure_sensitivity``): for every layer and candidate, the predicted increase
   of the mean token loss on calibration text when only that layer is quantized (with the
   configured scale init: the weights the candidate really gets). One forward and backward per
   micro-batch of calibration blocks gives each layer's input x_t and the gradient g_t = ∂(Σ loss)/∂y_t
   at its output; for a candidate with weight error ΔW = Ŵ − W the layer's output moves by
   δy_t = ΔW x_t, and two terms are recorded: the second-order (Fisher) term and the first-order one

       F = ½ · (1/T) Σ_t (g_t · δy_t)²,     G = (1/T) Σ_t g_t · δy_t

   (F: the empirical Fisher of the loss in the direction ΔW, each position's output gradient
   standing in for its token's: one backward gives all of them). The score allocated on
   (``predicted``) is by default F + max(G, 0): a first-order gain measured on a few calibration
   blocks is not credited, a first-order cost is. Only activations get gradients (the weights are frozen),
   every candidate of a layer is scored in the backward hook of that layer, and nothing but the
   candidates' ΔW is kept between micro-batches. ``benchmarks/allocation_smollm2.py track``
   compares the estimate with the true loss increase (the layer really quantized, the loss
   re-measured) on a sample of (layer, candidate) pairs: the rank correlation is reported in
   docs/quality.md.

3. **Allocation** (``allocate``): one candidate per layer minimising Σ score subject to
   Σ bytes ≤ budget — a multiple-choice knapsack, solved exactly by dynamic programming over the
   bytes in units of the greatest common divisor of every cost (exact), or, when that is too fine
   to tabulate, over units of ``budget / resolution`` with every cost rounded up (the budget is
   never exceeded; the optimum is exact for the rounded costs and the gap to the true optimum is
   bounded by a Lagrangian lower bound that is reported). An infeasible budget (below the
   cheapest candidate everywhere) is refused.

The result is a QuantConfig (``quant_config_yaml``): the most common choice as the default and one
override per other layer; ``paretoq train --quant_config alloc.yaml`` trains it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

from paretoq.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = "1.58,2,3,4,1.58:64,2:64,3:64,4:64"  # per row, and the same bits with groups of 64
DEFAULT_RESOLUTION = 200_000  # DP states when the exact byte grid is finer than this
OFF = 16


@dataclass(frozen=True)
class Candidate:
    bits: float
    group: int | None = None

    @property
    def label(self) -> str:
        if self.bits == OFF:
            return "bf16"
        return f"{self.bits:g}" + ("" if self.group is None else f":g{self.group}")


def parse_candidates(text: str) -> list[Candidate]:
    """"1.58,2,3,4" → per-row candidates; "3:64" = 3 bits with group size 64; "16" / "off" = bf16."""
    from paretoq.quant.config import parse_bits

    out: list[Candidate] = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        bits_s, _, group_s = item.partition(":")
        bits = 16 if bits_s.strip().lower() == "off" else parse_bits(bits_s)
        group = None
        if group_s:
            if bits == OFF:
                raise UserError(f"--candidates: {item!r}: a bf16 layer has no group size")
            try:
                group = int(group_s.lower().removeprefix("g"))
            except ValueError:
                raise UserError(f"--candidates: {item!r}: the group size after ':' must be a number") from None
            if group <= 0:
                raise UserError(f"--candidates: {item!r}: the group size must be positive")
        c = Candidate(bits, group)
        if c in out:
            raise UserError(f"--candidates: {item} is given twice")
        out.append(c)
    if not out:
        raise UserError("--candidates is empty")
    return out


def candidate_bytes(c: Candidate, out_features: int, in_features: int, ternary_format: str = "base3") -> int:
    """Bytes a packed export stores for one layer: codes + fp16 scales (bf16 weights for 16)."""
    from paretoq.quant.functional import SCHEMES, group_width
    from paretoq.quant.packed import code_format
    from paretoq.quant.packing import CODE_FORMATS

    numel = out_features * in_features
    if c.bits == OFF:
        return 2 * numel
    groups = in_features // group_width(c.group, in_features)
    return CODE_FORMATS[code_format(SCHEMES[c.bits], ternary_format)].nbytes(numel) + 2 * out_features * groups


def available(c: Candidate, in_features: int) -> bool:
    """Whether a layer of ``in_features`` inputs can take ``c`` (its group size divides the row)."""
    return c.group is None or in_features % c.group == 0


# --- the solver --------------------------------------------------------------------------------


@dataclass
class Allocation:
    choice: list[int]  # per layer, the index of its candidate
    loss: float  # Σ predicted ΔL of the choice
    bytes: int  # Σ exact bytes of the choice
    budget_bytes: int
    exact: bool  # True: the DP's grid held every cost exactly (the choice is the optimum)
    lower_bound: float  # a lower bound on the optimum's loss (Lagrangian dual); == loss when proven
    unit: int  # bytes per DP state
    estimate: str = ""  # the score the losses are (``predicted``), set by ``allocate``

    @property
    def gap(self) -> float:
        return max(0.0, self.loss - self.lower_bound)


def _lagrangian_bound(losses, costs, budget: int) -> float:
    """max over λ ≥ 0 of Σ_i min_c (loss_ic + λ cost_ic) − λ·budget: a lower bound on the optimum."""
    def dual(lam):
        return sum(min(l + lam * c for l, c in zip(li, ci) if c is not None)
                   for li, ci in zip(losses, costs)) - lam * budget

    hi = 1.0
    while dual(hi) > dual(hi / 2) and hi < 1e30:
        hi *= 2
    lo = 0.0
    for _ in range(200):  # ternary search on the concave dual
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if dual(m1) < dual(m2):
            lo = m1
        else:
            hi = m2
    return max(dual(0.0), dual((lo + hi) / 2))


def solve(losses: list[list[float]], costs: list[list[int]], budget: int,
          resolution: int = DEFAULT_RESOLUTION) -> Allocation:
    """Choose one candidate per layer: min Σ losses[i][c_i] s.t. Σ costs[i][c_i] ≤ budget (a loss of
    None = the candidate is not available to that layer).

    Dynamic programming over the bytes each layer spends above its cheapest candidate, in units u:
    u = the gcd of those extra costs when (budget − Σ cheapest)/u ≤ ``resolution`` (exact), else
    u = ⌈(budget − Σ cheapest)/resolution⌉ with every extra cost rounded up to whole units (never
    over the budget; optimal for the rounded costs; ``lower_bound`` bounds the gap). Raises
    UserError when even the cheapest choice is over the budget.
    """
    import numpy as np

    if len(losses) != len(costs) or any(len(a) != len(b) or not a for a, b in zip(losses, costs)):
        raise ValueError("losses and costs must have one non-empty row per layer, of equal lengths")
    costs = [[c if l is not None else None for l, c in zip(li, ci)] for li, ci in zip(losses, costs)]
    if any(all(c is None for c in row) for row in costs):
        raise ValueError("every layer needs at least one available candidate")
    low = [min(c for c in row if c is not None) for row in costs]
    cheapest = sum(low)
    if cheapest > budget:
        raise UserError(f"budget of {budget:,} bytes is infeasible: the cheapest candidate of every layer "
                        f"already takes {cheapest:,} bytes")
    # DP over the bytes above each layer's cheapest candidate (so rounding never makes a feasible case infeasible)
    extra = [[None if c is None else int(c) - m for c in row] for row, m in zip(costs, low)]
    slack = budget - cheapest
    g = reduce(math.gcd, [c for row in extra for c in row if c], 0) or 1
    exact = slack // g <= resolution
    unit = g if exact else -(-slack // resolution)
    cap = slack // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0  # best[b] = min loss of the layers so far using exactly b units above their cheapest
    picks = []
    for li, ci in zip(losses, extra):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for k, (l, c) in enumerate(zip(li, ci)):
            if c is None:
                continue
            w = -(-c // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[:cap + 1 - w] + l
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        picks.append(pick)
    b = int(np.argmin(best))
    choice = [0] * len(losses)
    for i in range(len(losses) - 1, -1, -1):
        k = int(picks[i][b])
        choice[i] = k
        b -= -(-extra[i][k] // unit)
    loss = float(sum(losses[i][k] for i, k in enumerate(choice)))
    total = int(sum(costs[i][k] for i, k in enumerate(choice)))
    assert total <= budget
    bound = loss if exact else min(loss, _lagrangian_bound([[0.0 if v is None else v for v in li] for li in losses],
                                                           costs, budget))
    return Allocation(choice, loss, total, budget, exact, bound, unit)


# --- sensitivity ---------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Per layer (model order) and candidate: predicted ΔL (½ Fisher term) and the first-order term."""

    layers: list[str]
    shapes: list[tuple[int, int]]  # (out_features, in_features)
    candidates: list[Candidate]
    delta_loss: list[list[float]]
    first_order: list[list[float]]
    tokens: int
    scale_init: str
    base_loss: float
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "shapes": [list(s) for s in self.shapes],
                "candidates": [[c.bits, c.group] for c in self.candidates], "delta_loss": self.delta_loss,
                "first_order": self.first_order, "tokens": self.tokens, "scale_init": self.scale_init,
                "base_loss": self.base_loss, "seconds": self.seconds, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        return cls(d["layers"], [tuple(s) for s in d["shapes"]], [Candidate(b, g) for b, g in d["candidates"]],
                   d["delta_loss"], d["first_order"], d["tokens"], d["scale_init"], d["base_loss"], d["seconds"],
                   d.get("meta", {}))


def candidate_weights(model, names: list[str], candidates: list[Candidate], scale_init: str = "reference",
                      calibration_data=None, stats=None) -> dict[str, list]:
    """Per layer, each candidate's quantized weight Ŵ (fp32; None for bf16) with ``scale_init``,
    exactly as ``quantize_model`` would make it for that layer (the model is not changed)."""
    import torch
    from torch import nn

    from paretoq.quant import scale_init as scale_init_lib
    from paretoq.quant.config import QuantConfig
    from paretoq.quant.linear import QuantLinear

    modules = {n: model.get_submodule(n) for n in names}
    if stats is None and scale_init_lib.needs_calibration(scale_init):
        if calibration_data is None:
            raise UserError(f"scale_init {scale_init!r} needs calibration data")
        stats = scale_init_lib.calibration_statistics(model, modules, scale_init, calibration_data)
    out: dict[str, list] = {}
    with torch.no_grad():
        for name, lin in modules.items():
            row = []
            for c in candidates:
                if c.bits == OFF or not available(c, lin.in_features):  # unavailable: never chosen (allocate)
                    row.append(None)
                    continue
                config = QuantConfig(w_bits=c.bits, group_size=c.group, scale_init=scale_init)
                config.check_layer(name, lin.in_features)
                tmp = nn.Linear(lin.in_features, lin.out_features, bias=False, device="meta")  # no random init
                tmp.weight = nn.Parameter(lin.weight.detach().float().clone(), requires_grad=False)
                q = QuantLinear.from_linear(tmp, config, name=name)
                scale_init_lib.initialize_scales({name: q}, scale_init, stats)
                row.append(q.quantized_weight().detach().float())
            out[name] = row
    return out


def measure_sensitivity(model, calibration_data, candidates: list[Candidate], scale_init: str = "reference",
                        batch_size: int = 2, quant_config=None, deltas: dict | None = None,
                        dtype=None) -> Sensitivity:
    """Predicted ΔL of every (selected layer, candidate) on ``calibration_data`` (token ids (N, L)).

    See the module docstring for the estimate. The model is used in fp32, eval mode, and restored.
    ``deltas`` (name → one ΔW per candidate, None = no change) replaces the candidates' weight errors
    (for tests: any perturbation can be scored). ``dtype``: the ΔW kept and the products ΔW x_t are
    in bf16 by default (half the memory, fast matrix units; ~3 significant digits are plenty for a
    ranking), fp32 on request; the model's own forward and backward stay in its dtype.
    """
    import torch
    import torch.nn.functional as F

    from paretoq.quant.config import QuantConfig
    from paretoq.quant.swap import selected_linears

    t0 = time.perf_counter()
    dtype = dtype or torch.bfloat16
    ids = calibration_data.long()
    selection = quant_config or QuantConfig(w_bits=4)
    targets = selected_linears(model, selection)
    if not targets:
        raise UserError("the model has no Linear layer to quantize (the default selection: Linear layers inside "
                        "numbered blocks, not the embeddings or the LM head)")
    names = [n for n, _ in targets]
    if deltas is None:  # ΔW = Ŵ − W, one layer at a time (fp32 only for the layer at hand)
        from paretoq.quant import scale_init as scale_init_lib

        logger.info("allocate: %d layers × %d candidates, scale init %s", len(names), len(candidates), scale_init)
        stats = None
        if scale_init_lib.needs_calibration(scale_init):
            stats = scale_init_lib.calibration_statistics(model, dict(targets), scale_init, ids)
        deltas = {}
        for n, m in targets:
            w_hat = candidate_weights(model, [n], candidates, scale_init, stats=stats)[n]
            deltas[n] = [None if w is None else w.sub_(m.weight.detach().float()).to(dtype) for w in w_hat]
        del stats
    else:
        deltas = {n: [None if d is None else d.to(dtype) for d in deltas[n]] for n in names}
    k = len(candidates)
    quad = {n: torch.zeros(k, dtype=torch.float64) for n in names}
    lin = {n: torch.zeros(k, dtype=torch.float64) for n in names}
    inputs: dict[str, torch.Tensor] = {}

    def forward_hook(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()

            def grad_hook(grad):
                x = inputs.pop(name).reshape(-1, module.in_features).to(dtype)
                g = grad.reshape(-1, module.out_features).float()
                for j, dw in enumerate(deltas[name]):
                    if dw is None:
                        continue
                    s = (g * (x @ dw.t()).float()).sum(dim=1, dtype=torch.float64)  # g_t · δy_t per position
                    quad[name][j] += s.square().sum()
                    lin[name][j] += s.sum()
            if output.requires_grad:
                output.register_hook(grad_hook)
        return hook

    def embed_hook(module, args, output):  # gradients start at the embeddings' output, not the weights
        return output.detach().requires_grad_(True)

    handles = [m.register_forward_hook(forward_hook(n)) for n, m in targets]
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    tokens, loss_sum = 0, 0.0
    try:
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            loss.backward()
            inputs.clear()
            tokens += batch[:, 1:].numel()
            loss_sum += loss.item()
            logger.info("allocate: sensitivities, %d of %d calibration blocks (%.0f s)", min(start + batch_size, len(ids)),
                        len(ids), time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return Sensitivity(
        layers=names, shapes=[(m.out_features, m.in_features) for _, m in targets], candidates=list(candidates),
        delta_loss=[[0.5 * float(v) / tokens for v in quad[n]] for n in names],
        first_order=[[float(v) / tokens for v in lin[n]] for n in names],
        tokens=tokens, scale_init=scale_init, base_loss=loss_sum / tokens, seconds=time.perf_counter() - t0)


# --- from a sensitivity table to a QuantConfig -----------------------------------------------------


def budget_bytes(sens: Sensitivity, bits_per_weight: float) -> int:
    """The byte budget of ``bits_per_weight`` averaged over the quantizable layers' weights."""
    weights = sum(o * i for o, i in sens.shapes)
    return int(math.floor(bits_per_weight * weights / 8))


ESTIMATES = ("clipped", "fisher", "taylor")
DEFAULT_ESTIMATE = "clipped"


def predicted(sens: Sensitivity, estimate: str = DEFAULT_ESTIMATE) -> list[list[float]]:
    """Per layer and candidate, the score the allocation minimises:

    - "fisher": the ½ Fisher term F (≥ 0);
    - "taylor": first-order term G + F (the second-order Taylor expansion, the Fisher as its Hessian);
    - "clipped" (the default): F + max(G, 0) — the first-order term only where it predicts a loss
      increase. A negative G says quantizing the layer *lowers* the calibration loss; on held-out
      text that gain does not hold (the calibration blocks are few and, with gptq, the very tokens
      the weights were fitted to), so it is not credited, while a positive G is a real cost.
      Measured on SmolLM2-135M (docs/quality.md): the best single score over both scale inits.
    """
    if estimate not in ESTIMATES:
        raise UserError(f"--estimate {estimate!r} is unknown: use one of {', '.join(ESTIMATES)}")
    if estimate == "fisher":
        return sens.delta_loss
    if estimate == "taylor":
        return [[q + f for q, f in zip(qs, fs)] for qs, fs in zip(sens.delta_loss, sens.first_order)]
    return [[q + max(f, 0.0) for q, f in zip(qs, fs)] for qs, fs in zip(sens.delta_loss, sens.first_order)]


def allocate(sens: Sensitivity, budget: int, ternary_format: str = "base3",
             resolution: int = DEFAULT_RESOLUTION, estimate: str = DEFAULT_ESTIMATE) -> Allocation:
    costs = [[candidate_bytes(c, o, i, ternary_format) if available(c, i) else 0 for c in sens.candidates]
             for o, i in sens.shapes]
    losses = [[v if available(c, i) else None for c, v in zip(sens.candidates, row)]
              for (_, i), row in zip(sens.shapes, predicted(sens, estimate))]
    for name, (_, i), row in zip(sens.layers, sens.shapes, losses):
        if all(v is None for v in row):
            raise UserError(f"no candidate fits {name}: every candidate's group size fails to divide its "
                            f"in_features {i}; add a per-row candidate (e.g. 4)")
    alloc = solve(losses, costs, budget, resolution)
    alloc.estimate = estimate
    return alloc


def allocation_config(sens: Sensitivity, alloc: Allocation, scale_init: str | None = None):
    """The QuantConfig of an allocation: the most common candidate (by weights) as the default and an
    override (the layer's exact name) for every layer that differs."""
    from paretoq.quant.config import LayerOverride, QuantConfig

    weight_of: dict[Candidate, int] = {}
    for (o, i), k in zip(sens.shapes, alloc.choice):
        c = sens.candidates[k]
        weight_of[c] = weight_of.get(c, 0) + o * i
    default = max(weight_of, key=lambda c: (weight_of[c], -c.bits))
    overrides = [LayerOverride("^" + re.escape(name) + "$", sens.candidates[k].bits, sens.candidates[k].group)
                 for name, k in zip(sens.layers, alloc.choice) if sens.candidates[k] != default]
    return QuantConfig(w_bits=default.bits, group_size=default.group, scale_init=scale_init or sens.scale_init,
                       overrides=tuple(overrides))


def summary(sens: Sensitivity, alloc: Allocation) -> dict:
    weights = sum(o * i for o, i in sens.shapes)
    counts: dict[str, int] = {}
    for (o, i), k in zip(sens.shapes, alloc.choice):
        label = sens.candidates[k].label
        counts[label] = counts.get(label, 0) + o * i
    return {"bits_per_weight": 8 * alloc.bytes / weights, "budget_bits_per_weight": 8 * alloc.budget_bytes / weights,
            "bytes": alloc.bytes, "budget_bytes": alloc.budget_bytes, "predicted_delta_loss": alloc.loss,
            "lower_bound": alloc.lower_bound, "exact": alloc.exact, "unit_bytes": alloc.unit,
            "weights_by_candidate": {k: v / weights for k, v in sorted(counts.items())}}


def header_text(sens: Sensitivity, alloc: Allocation, command: str = "") -> str:
    s = summary(sens, alloc)
    mix = ", ".join(f"{k} {v:.1%}" for k, v in s["weights_by_candidate"].items())
    lines = [f"paretoq allocate: {s['bits_per_weight']:.4f} bits/weight (budget {s['budget_bits_per_weight']:.4f}; "
             "codes + fp16 scales over the quantizable layers, ternary as base-3)",
             f"predicted loss increase {alloc.loss:.5g} (score {alloc.estimate or DEFAULT_ESTIMATE}; {'exact optimum' if alloc.exact else f'gap to optimum <= {alloc.gap:.3g}'}); "
             f"weights by candidate: {mix}",
             f"sensitivity: {sens.tokens} calibration tokens, scale_init {sens.scale_init}, {sens.seconds:.0f} s"]
    if command:
        lines.insert(0, command)
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------


def calibration_ids(model_dir, data_path, samples: int, block: int, seed: int = 0, cache_dir=None):
    """``samples`` blocks of ``block`` tokens of ``data_path`` (JSONL/text), drawn by ``seed``."""
    from paretoq.data import load_blocks
    from paretoq.loading import load_tokenizer
    from paretoq.training.recipe import calibration_blocks

    blocks = load_blocks(data_path, load_tokenizer(model_dir), block, cache_dir)
    if len(blocks) == 0:
        raise UserError(f"{data_path}: no block of {block} tokens")
    return calibration_blocks(blocks, samples, seed)


def sensitivity_of_folder(model_dir, calibration, candidates: list[Candidate], scale_init: str = "reference",
                          batch_size: int = 2) -> Sensitivity:
    import torch

    from paretoq.loading import load_model

    model = load_model(model_dir, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None):
        raise UserError(f"{model_dir} is already quantized: paretoq allocate measures a full-precision model")
    sens = measure_sensitivity(model, calibration, candidates, scale_init, batch_size)
    sens.meta["model"] = str(model_dir)
    return sens
