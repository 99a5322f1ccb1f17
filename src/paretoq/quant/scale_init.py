"""Scale initialisation beyond the reference: a per-row / per-group search, the math in one place.

``scale_init`` (``QuantConfig``) chooses how ``weight_clip_val`` starts:

- ``"reference"`` — ParetoQ's closed forms (``Scheme.init_scale``: mean|W|, max|W| or max|W|/Qp).
- ``"mse"`` — for every row (or group of g input columns) independently, α = r·α_ref with the
  ratio r that minimises the quantization error of that row/group

      E(α) = Σ_j (W_ij − α̃·q(W_ij/α̃))²,   α̃ = max(α, 1e-5),

  where q is the scheme's own ``quantize`` (so every bit width is handled alike, no branching).
- ``"mse_act"`` — the same search on the activation-weighted error Σ_j h_j·(W_ij − Ŵ_ij)² with
  h_j = E[x_j²], the second moment of input column j over calibration tokens. It is the diagonal
  of the layer's Hessian proxy XᵀX: E‖(W − Ŵ)x‖² ≈ Σ_j h_j·Σ_i (W_ij − Ŵ_ij)² when input channels
  are uncorrelated (the proxy of AWQ / GPTQ-style methods). Columns that never carry signal
  (h_j ≈ 0) stop dictating the scale, so an outlier weight there is clipped instead of
  stretching the grid for the whole row.
- ``"gptq"`` — mse_act scales, then the latent weights are rewritten by GPTQ-style error feedback
  (``error_feedback_weights``): columns are rounded left to right and each column's rounding error
  is compensated on the columns not yet rounded through the full E[x xᵀ]. The scales are the
  same as mse_act's; W itself moves (within the clip range), so Ŵ = Q(W') is a much better start
  at 2–3 bits. Needs an n×n fp32 matrix per distinct layer input during calibration (siblings
  fed the same tensor share one).

Search (``search_scale``): ``COARSE_RATIOS`` (41 ratios in [0.2, 1.2], step 0.025) — continued
upwards in the same steps, up to ``MAX_RATIO``, for groups whose best ratio is still the last one
(1-bit with activation weights can want α > 1.2·mean|W|) — then a local refinement of
``REFINE_POINTS`` ratios within ± one coarse step around each group's best, so the final
resolution is 0.0025 of α_ref. The reference scale itself (r = 1) is the starting point and a
candidate only replaces it when it is strictly better, so the objective never exceeds the
reference init's. Rows are processed in chunks (``row_chunk_elements``) and one layer at a time,
so the extra memory is a few copies of a chunk, not of the model.

Plain MSE is known to hurt 3–4 bits on real LMs (it clips the outliers that matter most); the
activation weighting fixes that, error feedback goes further — measured in ``docs/quality.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from paretoq.errors import QuantConfigError
from paretoq.quant.functional import SCALE_EPS, Scheme, group_width, init_scale

logger = logging.getLogger(__name__)

COARSE_RATIOS = tuple(round(0.2 + 0.025 * i, 4) for i in range(41))  # 0.2, 0.225, ..., 1.2
REFINE_POINTS = 21  # ratios within ± one coarse step around each group's best
MAX_RATIO = 4.0  # the upward walk past the grid stops here
ROW_CHUNK_ELEMENTS = 1 << 22  # weight elements per chunk (≈ 16 MB per fp32 temporary)


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    m, n = weight.shape
    g = group_width(group_size, n)
    return weight.reshape(m, n // g, g)


@torch.no_grad()
def quantization_error(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, group_size: int | None,
                       importance: torch.Tensor | None = None) -> torch.Tensor:
    """E per row/group, shape (m, G): Σ_j h_j·(W_ij − α̃·q(W_ij/α̃))² (h ≡ 1 without ``importance``)."""
    w = _grouped(weight.float(), group_size)
    a = scale.float().reshape(w.shape[0], w.shape[1], 1).clamp_min(SCALE_EPS)
    err = scheme.quantize(w / a).mul_(a).sub_(w).square_()  # in place: this runs ~10^2 times per weight
    if importance is None:
        return err.sum(dim=-1)
    return err.mul_(importance.float().reshape(1, w.shape[1], w.shape[2])).sum(dim=-1)


@torch.no_grad()
def search_scale(weight: torch.Tensor, scheme: Scheme, group_size: int | None,
                 importance: torch.Tensor | None = None, *, ratios: Iterable[float] = COARSE_RATIOS,
                 refine_points: int = REFINE_POINTS,
                 row_chunk_elements: int = ROW_CHUNK_ELEMENTS) -> torch.Tensor:
    """The scale (m, G) minimising ``quantization_error`` over α = r·α_ref, r in ``ratios`` (+ refinement).

    ``importance``: per-input-column weights h (shape (n,)), e.g. E[x²]; ``None`` = plain MSE.
    Returns α_ref wherever no candidate is strictly better (so E(result) ≤ E(reference)).
    """
    weight = weight.detach()
    m, n = weight.shape
    ratios_t = torch.tensor(sorted(set(float(r) for r in ratios)), dtype=torch.float32)
    if len(ratios_t) == 0 or (ratios_t <= 0).any():
        raise ValueError(f"scale search ratios must be positive, got {ratios_t.tolist()}")
    step = float((ratios_t[1:] - ratios_t[:-1]).max()) if len(ratios_t) > 1 else 0.0
    fine = torch.linspace(-step, step, refine_points) if refine_points > 1 and step > 0 else torch.zeros(0)
    h = None if importance is None else importance.detach().to(device=weight.device, dtype=torch.float32)
    rows_per_chunk = max(1, row_chunk_elements // max(n, 1))
    out = []
    for start in range(0, m, rows_per_chunk):
        w = weight[start:start + rows_per_chunk].float()
        ref = init_scale(w, scheme, group_size)  # (c, G)
        best_err = quantization_error(w, ref, scheme, group_size, h)
        best_ratio = torch.ones_like(ref)
        for r in ratios_t.tolist():
            _try(w, ref, torch.full_like(ref, r), scheme, group_size, h, best_err, best_ratio)
        # groups whose optimum lies past the top of the grid (e.g. 1-bit with weights h): walk
        # each of them on upwards in coarse steps while it still improves
        r = float(ratios_t[-1])
        while step > 0 and r < MAX_RATIO and bool((frontier := best_ratio == r).any()):
            r = round(r + step, 6)
            _try(w, ref, torch.full_like(ref, r), scheme, group_size, h, best_err, best_ratio, only=frontier)
        centre = best_ratio.clone()
        for d in fine.tolist():
            _try(w, ref, (centre + d).clamp_min(1e-3), scheme, group_size, h, best_err, best_ratio)
        out.append(ref * best_ratio)
    return torch.cat(out, dim=0)


def _try(w, ref, ratio, scheme, group_size, h, best_err, best_ratio, only=None) -> None:
    """Replace (in place) the best ratio of every group (in ``only``) where ``ratio`` is strictly better."""
    err = quantization_error(w, ref * ratio, scheme, group_size, h)
    better = err < best_err
    if only is not None:
        better &= only
    best_err[better] = err[better]
    best_ratio[better] = ratio[better]


# --- calibration: E[x²] per input column of each selected Linear ---------------------------------


@torch.no_grad()
def input_second_moments(model: nn.Module, modules: Mapping[str, nn.Module], calibration_data: torch.Tensor,
                         batch_size: int = 4) -> dict[str, torch.Tensor]:
    """E[x_j²] over every calibration token, for the input of each module in ``modules`` (name → module).

    ``calibration_data``: token ids, (num_blocks, block_len) (or one (block_len,) block). The model
    runs forward (eval mode, no grad) in micro-batches of ``batch_size`` blocks; forward pre-hooks
    accumulate Σ x² and the token count in fp32. Hooks are removed and the training mode restored
    whatever happens.
    """
    return input_statistics(model, modules, calibration_data, batch_size, full=False)


@torch.no_grad()
def input_statistics(model: nn.Module, modules: Mapping[str, nn.Module], calibration_data: torch.Tensor,
                     batch_size: int = 4, full: bool = False) -> dict[str, torch.Tensor]:
    """E[x²] (shape (n,)) or, with ``full``, E[x xᵀ] (shape (n, n)) of each module's input.

    Sibling modules fed the very same tensor (q/k/v, gate/up) share one accumulator (and return
    the same tensor object), found on the first micro-batch by the input's storage.
    """
    ids = _as_ids(calibration_data)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}  # module → the sibling whose accumulator it shares
    first_seen: dict[tuple, str] = {}  # (parent, storage, shape) → module, first micro-batch only
    batch_no = [0]

    def hook_for(name):
        parent = name.rpartition(".")[0]

        def hook(module, args):
            x = args[0].detach()
            if batch_no[0] == 0:
                key = (parent, x.data_ptr(), tuple(x.shape))
                if key in first_seen and first_seen[key] != name:
                    alias[name] = first_seen[key]
                else:
                    first_seen[key] = name
            if name in alias:
                return
            flat = x.reshape(-1, x.shape[-1]).float()
            # fp32 even when the forward runs under autocast (mid-training: accelerate wraps forward)
            with torch.autocast(device_type=x.device.type, enabled=False):
                acc = flat.T @ flat if full else flat.square().sum(dim=0)
            if name in sums:
                sums[name] += acc
            else:
                sums[name] = acc
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(name)) for name, mod in modules.items()]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
            batch_no[0] += 1
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    missing = [n for n in modules if alias.get(n, n) not in sums]
    if missing:
        raise RuntimeError(f"calibration forward never reached {len(missing)} layer(s), e.g. {missing[0]}")
    means = {name: sums[name].div_(counts[name]) for name in sums}
    return {name: means[alias.get(name, name)] for name in modules}


def _as_ids(calibration_data) -> torch.Tensor:
    if not torch.is_tensor(calibration_data) or calibration_data.dtype.is_floating_point:
        raise QuantConfigError("calibration_data must be a tensor of token ids, shape (num_blocks, block_len)")
    ids = calibration_data.long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise QuantConfigError(f"calibration_data must have shape (num_blocks, block_len), got {tuple(ids.shape)}")
    return ids


# --- applying an init to swapped layers ----------------------------------------------------------


@dataclass(frozen=True)
class ScaleInit:
    """One ``scale_init`` method (module docstring): what it measures and what it does with it."""

    search: bool  # search α = r·α_ref per row/group (else the reference closed form stays)
    statistics: str | None  # calibration statistics of each layer input: None, "E[x²]" or "E[x xᵀ]"
    error_feedback: bool  # rewrite the latent weights by GPTQ-style error feedback


SCALE_INITS: dict[str, ScaleInit] = {
    "reference": ScaleInit(search=False, statistics=None, error_feedback=False),
    "mse": ScaleInit(search=True, statistics=None, error_feedback=False),
    "mse_act": ScaleInit(search=True, statistics="E[x²]", error_feedback=False),
    "gptq": ScaleInit(search=True, statistics="E[x xᵀ]", error_feedback=True),
}


def needs_calibration(scale_init: str) -> bool:
    return SCALE_INITS[scale_init].statistics is not None


def calibration_statistics(model: nn.Module, modules: Mapping[str, nn.Module], scale_init: str,
                           calibration_data) -> dict[str, torch.Tensor] | None:
    """What ``initialize_scales`` needs for ``scale_init``: None, E[x²] or E[x xᵀ] per layer input."""
    if not needs_calibration(scale_init):
        return None
    return input_statistics(model, modules, calibration_data, full=SCALE_INITS[scale_init].statistics == "E[x xᵀ]")


@torch.no_grad()
def initialize_scales(layers: Mapping[str, nn.Module], scale_init: str,
                      stats: Mapping[str, torch.Tensor] | None = None) -> None:
    """Set ``weight_clip_val`` of every QuantLinear in ``layers`` (name → module) by ``scale_init``.

    "reference" leaves the closed form that ``QuantLinear.from_linear`` wrote; "mse" searches with
    h ≡ 1; "mse_act" with h = E[x²] = ``stats[name]``; "gptq" with h = diag E[x xᵀ], then rewrites
    the latent weight by ``error_feedback_weights``. One layer at a time.
    """
    method = SCALE_INITS[scale_init]
    if not method.search:
        return
    for name, layer in layers.items():
        h = None
        if method.statistics is not None:
            if stats is None or name not in stats:
                raise KeyError(f"no calibration statistics for layer {name}")
            h = stats[name]
        full = method.statistics == "E[x xᵀ]"
        alpha = search_scale(layer.weight, layer.scheme, layer.group_size, torch.diagonal(h) if full else h)
        layer.weight_clip_val.copy_(alpha.to(layer.weight_clip_val))
        if method.error_feedback:
            w = error_feedback_weights(layer.weight, alpha, layer.scheme, layer.group_size, h)
            layer.weight.copy_(w.to(layer.weight))
    logger.info("initialised %d layers by %s", len(layers), scale_init)


# --- GPTQ-style error feedback (an optional extra on top of the scale search) --------------------


@torch.no_grad()
def error_feedback_weights(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, group_size: int | None,
                           hessian: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Latent weights W' whose quantization compensates the rounding error column by column.

    GPTQ (Frantar et al. 2023, "OBQ" error feedback with the Cholesky form): with H = E[x xᵀ]
    (+ ``damp``·mean(diag H)·I) and U the upper Cholesky factor of H⁻¹, columns are quantized left
    to right, q_j = α̃·q(w_j/α̃) with the given (fixed) scales, and the error e_j = (w_j − q_j)/U_jj
    is pushed onto the columns not yet quantized: w_k −= e_j·U_jk (k > j). This minimises
    ‖(W − Ŵ)X‖² greedily instead of ‖W − Ŵ‖² per element.

    Returns W' = each column as it was when quantized, clamped to the scheme's clip range
    [lo·α̃, hi·α̃] — the same Ŵ (saturated values stay saturated), but every latent weight inside
    the range where the straight-through gradient flows, so QAT can keep training all of them.
    """
    m, n = weight.shape
    g = group_width(group_size, n)
    w = weight.detach().float().clone()
    a = scale.detach().float().clamp_min(SCALE_EPS).repeat_interleave(g, dim=1)  # (m, n): α̃ per column
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    latent = torch.empty_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(m, i2 - i1), u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col, aj = w1[:, j], a[:, i1 + j]
            latent[:, i1 + j] = col
            e = (col - scheme.quantize(col / aj) * aj) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return torch.minimum(torch.maximum(latent, a * scheme.lo), a * scheme.hi)
