"""`QuantLinear`: an ``nn.Linear`` whose weight is fake-quantized on the fly.

The latent weight stays in full precision (fp32 master weights); the forward uses
Ŵ = α̃·q(W/α̃) from :mod:`paretoq.quant.functional`, produced directly in the compute dtype (bf16
under autocast: the same bits as the reference's ``Ŵ.to(bf16)``). The scale ``weight_clip_val``
(the reference's name, so ParetoQ checkpoints load as they are) is an fp32 parameter of shape
(out_features, groups), created and initialised here, from the weight, before any optimizer
exists. Biases are kept. Each layer's ``kernels`` runs its quantizer: None (the eager math) or a
``paretoq.quant.fused.FusedKernels``, chosen with ``set_kernels(model, ...)`` from that module.

Fake-quant cache (opt-in: ``set_fake_quant_cache(model)``; ``QATTrainer`` turns it on in
single-process runs). W and α change only at the optimizer step, so Ŵ is computed once per step
instead of once per forward (gradient accumulation, gradient checkpointing's recomputation).
Backward does not go through the quantizer each micro-batch either: the gradients g_i = ∂L_i/∂Ŵ
are summed in fp32 (a single g_1 is held as autograd hands it over, bf16 under autocast: no copy)
and ``flush_fake_quant_grads(model)`` (before gradient clipping and the optimizer step) turns the
sum into ∂L/∂W and ∂L/∂α once. That is exact because both are linear in g for fixed W and α:

    ∂L/∂W = M ⊙ Σ_i g_i = Σ_i M ⊙ g_i        (bit for bit: M is 0/1, Σ g_i summed in the same order)
    ∂L/∂α = s_g Σ_row c ⊙ Σ_i g_i = Σ_i s_g Σ_row c ⊙ g_i   (equal up to fp32 summation order)

With one micro-batch per step both are bit for bit those of the uncached path. The cache is valid
while W and α keep their storage and version counters (any in-place update bumps them); a change
with gradients still pending raises, since they can no longer be pushed through the quantizer.
Only modules in training mode use it. Not for DDP/FSDP/DeepSpeed: their gradient hooks expect
∂L/∂W during backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paretoq.quant.config import QuantConfig
from paretoq.quant.functional import (fake_quantize, fake_quantize_activation, group_label, group_width, init_scale,
                                      quantize_backward, quantize_weight)


SCALE_PARAM = "weight_clip_val"  # the scale's name, as in the reference (its checkpoints load as they are)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in for input ``x``: autocast's when it is on, else x's."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class QuantLinear(nn.Linear):
    """Linear layer with a ParetoQ fake-quantized weight and a learnable per-row/group scale."""

    cache_quantized_weight = False  # see the module docstring; per module, set by set_fake_quant_cache
    kernels = None  # the quantizer: None = eager, or a fused.FusedKernels; per module, set by fused.set_kernels

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
        self.a_block = config.activation_block("", self.in_features)  # 8-bit activations: None = per token
        groups = self.in_features // group_width(config.group_size, self.in_features)
        self.weight_clip_val = nn.Parameter(torch.empty(self.out_features, groups, dtype=torch.float32, device=device))
        self._clear_cache()

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
        return fake_quantize(self.weight, self.weight_clip_val, self.scheme, kernels=self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_config.a_bits == 8:  # 8-bit activations (off by default): per token or per block
            x = fake_quantize_activation(x, self.a_block)
        dtype = compute_dtype(x)
        if self.cache_quantized_weight and self.training and not torch.is_inference_mode_enabled():
            return F.linear(x, self._cached_weight(dtype), self.bias)
        w, a = self.weight, self.weight_clip_val
        if dtype == w.dtype and torch.is_grad_enabled() and (w.requires_grad or a.requires_grad):
            # no cast: FP training would keep no copy of the weight for backward, so neither do we
            return _RecomputedQuantLinear.apply(x, w, a, self.bias, self.scheme, self.kernels)
        # a cast (bf16 autocast): FP training keeps the cast weight for backward as we keep Ŵ
        return F.linear(x, fake_quantize(w, a, self.scheme, dtype, self.kernels), self.bias)

    # -- fake-quant cache ----------------------------------------------------------------------
    def _clear_cache(self) -> None:
        self._cache_state = None  # (versions, storages) of W and α the cache was built from
        self._cache_weight = None  # Ŵ in the compute dtype
        self._cache_grad = None  # Σ ∂L/∂Ŵ not yet pushed through the quantizer (fp32 from the 2nd micro-batch)
        self._cache_grad_owned = False  # whether _cache_grad is our buffer (else autograd's tensor: read only)

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w, a = self.weight, self.weight_clip_val
        state = (w._version, a._version, w.data_ptr(), a.data_ptr())
        if state != self._cache_state:
            if self._cache_grad is not None:
                raise RuntimeError("QuantLinear: weight or scale changed while fake-quant gradients were pending; "
                                   "call flush_fake_quant_grads(model) before the optimizer step")
            self._clear_cache()
            self._cache_state = state
        if self._cache_weight is None or self._cache_weight.dtype != dtype:
            with torch.no_grad():
                self._cache_weight = quantize_weight(w, a, self.scheme, dtype, self.kernels)
        if not (torch.is_grad_enabled() and (w.requires_grad or a.requires_grad)):
            return self._cache_weight
        return _CachedFakeQuantize.apply(self._cache_weight, w, a, self)

    def _add_grad(self, grad: torch.Tensor) -> None:
        if self._cache_grad is None:
            # held as autograd hands it over (bf16 under autocast), not copied: with one micro-batch
            # per step the flush's kernel reads it once, as the uncached backward would
            self._cache_grad, self._cache_grad_owned = grad, False
            return
        if not self._cache_grad_owned:  # a second micro-batch: sum in an fp32 buffer of our own
            self._cache_grad = torch.empty_like(self.weight, dtype=torch.float32).copy_(self._cache_grad)
            self._cache_grad_owned = True
        self._cache_grad.add_(grad.to(torch.float32))  # fp32 += fp32: a bf16 operand takes a slow mixed-dtype path

    def flush_grad(self) -> None:
        """Push the summed ∂L/∂Ŵ through the quantizer backward into W.grad and α.grad; drop the cache."""
        grad, owned, w, a = self._cache_grad, self._cache_grad_owned, self.weight, self.weight_clip_val
        self._clear_cache()
        if grad is None:
            return
        gw, ga = quantize_backward(w, a, self.scheme, grad, weight_grad=w.requires_grad, scale_grad=a.requires_grad,
                                   inplace=owned, kernels=self.kernels)
        for p, g in ((w, gw), (a, ga)):
            if g is not None:
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g)

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
        return f"{super().extra_repr()}, w_bits={self.quant_config.w_bits}, scales {group_label(self.group_size)}"


class _RecomputedQuantLinear(torch.autograd.Function):
    """y = x Ŵᵀ + b in the weight's own dtype, keeping x, W and α for backward and recomputing Ŵ
    there (one quantizer pass, far cheaper than the matrix products) instead of holding a full copy
    of Ŵ from forward to backward. The products are those autograd makes for ``F.linear``."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, scheme, kernels):
        ctx.scheme, ctx.kernels = scheme, kernels
        ctx.save_for_backward(x, weight, scale)
        return F.linear(x, quantize_weight(weight, scale, scheme, kernels=kernels), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_a = grad_b = None
        if need_x:
            grad_x = g.mm(quantize_weight(weight, scale, ctx.scheme, kernels=ctx.kernels)).reshape(x.shape)
        if need_w or need_a:
            grad_w_hat = g.t().mm(x.reshape(-1, x.shape[-1]))
            grad_w, grad_a = quantize_backward(weight, scale, ctx.scheme, grad_w_hat, weight_grad=need_w,
                                               scale_grad=need_a, inplace=True, kernels=ctx.kernels)
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_a, grad_b, None, None


class _CachedFakeQuantize(torch.autograd.Function):
    """Hands out the layer's cached Ŵ; backward adds ∂L/∂Ŵ to the layer's fp32 sum (no grads yet)."""

    @staticmethod
    def forward(ctx, w_hat, weight, scale, layer):
        ctx.layer = layer
        return w_hat.view_as(w_hat)

    @staticmethod
    def backward(ctx, grad):
        ctx.layer._add_grad(grad)
        return None, None, None, None


def set_fake_quant_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the fake-quant cache of every ``QuantLinear`` in ``model`` on or off; returns how many.

    With it on, call ``flush_fake_quant_grads(model)`` after the last backward of each optimizer
    step (``QATTrainer`` does): until then W.grad and α.grad do not hold the step's gradients.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        if not enabled:
            m.flush_grad()
        m.cache_quantized_weight = enabled
    return len(layers)


def flush_fake_quant_grads(model: nn.Module) -> None:
    """Turn every cached layer's summed ∂L/∂Ŵ into ∂L/∂W and ∂L/∂α (once per optimizer step)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.flush_grad()
