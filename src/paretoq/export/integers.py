"""A quantized layer as integers and scales: Ŵ = k · s, k small integers, s = α̃ · step per row or group.

Every ParetoQ level set is an integer grid (``Scheme.integer_grid``: 2 bits → step 1/4, k ∈ {−3, −1, 1, 3};
ternary → step 2/3, k ∈ {−1, 0, 1}; binary, 3 and 4 bits → step 1). The engine exports (GGUF,
compressed-tensors) store exactly these k and s; this module reads them off a fake-quant ``QuantLinear``
or a packed layer, once, for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paretoq.quant.functional import SCALE_EPS, quantize_codes


@dataclass
class LayerIntegers:
    """k (out, in) int8 and the per-row / per-group scale s = α̃ · step (out, groups), float64."""

    k: torch.Tensor
    scale: torch.Tensor
    grid: tuple[int, ...]
    bits: float

    @property
    def group_size(self) -> int:
        """Weights per scale along a row (= in_features for per-row scales)."""
        return self.k.shape[1] // self.scale.shape[1]

    def permute_rows(self, perm: torch.Tensor) -> "LayerIntegers":
        return LayerIntegers(self.k[perm], self.scale[perm], self.grid, self.bits)

    def scaled(self, factor: float) -> "LayerIntegers":
        """The same integers with every scale × ``factor`` (a constant folded into the layer)."""
        return LayerIntegers(self.k, self.scale * factor, self.grid, self.bits)

    def dequantized(self) -> torch.Tensor:
        """k · s as float64 (out, in)."""
        return self.k.double() * self.scale.repeat_interleave(self.group_size, dim=1)


def layer_integers(module: nn.Module) -> LayerIntegers | None:
    """The integers and scales of a QuantLinear (or of a packed layer exposing ``codes()``), else None."""
    scheme = getattr(module, "scheme", None)
    if scheme is None:
        return None
    if hasattr(module, "weight_clip_val"):  # QuantLinear: codes of the fake-quantized latent weight
        weight, alpha = module.weight.detach().float(), module.weight_clip_val.detach().float()
        codes = quantize_codes(weight, alpha, scheme)
    elif callable(getattr(module, "codes", None)) and getattr(module, "scales", None) is not None:
        weight, alpha = None, module.scales.detach().float()
        codes = module.codes()
    else:
        return None
    step, grid = scheme.integer_grid
    k = torch.tensor(grid, dtype=torch.int8)[codes.long()]
    if weight is not None and 0 not in grid and float(scheme.quantize(torch.zeros(1))) == 0.0:
        # fake-quant binary gives sign(0) = 0 for weights that are exactly zero; the exports store that 0
        zero = weight == 0
        if zero.any():
            k = torch.where(zero, torch.zeros_like(k), k)
            grid = tuple(sorted({*grid, 0}))
    scale = alpha.double().clamp_min(SCALE_EPS) * step
    return LayerIntegers(k, scale, grid, scheme.bits)
