"""`QuantLinear`: an ``nn.Linear`` whose weight is fake-quantized on the fly.

The latent weight stays in full precision (fp32 master weights); the forward uses
Ŵ = α̃·q(W/α̃) from :mod:`paretoq.quant.functional`. The scale ``weight_clip_val`` (the
reference's name, so ParetoQ checkpoints load as they are) is an fp32 parameter of shape
(out_features, groups), created and initialised here, from the weight, before any optimizer
exists. Biases are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paretoq.quant.config import QuantConfig
from paretoq.quant.functional import fake_quantize, init_scale


class QuantLinear(nn.Linear):
    """Linear layer with a ParetoQ fake-quantized weight and a learnable per-row/group scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, config: QuantConfig,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(config, device=device)

    def _setup(self, config: QuantConfig, device=None) -> None:
        if not config.enabled:
            raise ValueError("QuantLinear needs a quantizing config (w_bits 1, 1.58, 2, 3 or 4)")
        self.quant_config = config
        self.scheme = config.scheme
        self.group_size = config.group_size
        groups = 1 if config.group_size is None else self.in_features // config.group_size
        self.weight_clip_val = nn.Parameter(torch.empty(self.out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, name: str = "", init: bool = True) -> "QuantLinear":
        """Wrap ``linear``, reusing its weight and bias Parameters (no copy).

        ``init=True`` sets the scale from the weight (``config.scale_init``); ``init=False`` leaves
        it to be loaded from a checkpoint (e.g. on the meta device inside ``from_pretrained``).
        """
        config.check_layer(name or type(linear).__name__, linear.in_features)
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight = linear.weight
        q.bias = linear.bias
        q._setup(config, device=linear.weight.device)
        if init:
            q.reset_scale()
        return q

    @torch.no_grad()
    def reset_scale(self) -> None:
        """Reference initialisation of ``weight_clip_val`` from the current weight."""
        self.weight_clip_val.copy_(init_scale(self.weight, self.scheme, self.group_size))

    def quantized_weight(self) -> torch.Tensor:
        """Ŵ, differentiable with respect to the weight and the scale."""
        return fake_quantize(self.weight, self.weight_clip_val, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with Ŵ baked in (the fake-quant weights, dequantized)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.quantized_weight())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        group = "row" if self.group_size is None else f"group {self.group_size}"
        return f"{super().extra_repr()}, w_bits={self.quant_config.w_bits}, scale per {group}"
