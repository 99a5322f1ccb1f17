"""Quantized embedding table and LM head (``embed_bits`` / ``head_bits`` of ``QuantConfig``).

Fake quantization (training, and the "fake" folder format):

- ``QuantEmbedding``: an ``nn.Embedding`` whose table is Ŵ = α̃·q(W/α̃), the same math and
  gradients as a ``QuantLinear`` (:mod:`paretoq.quant.functional`; the latent W and the learnable
  scale ``weight_clip_val`` (num_embeddings, groups) both get gradients, straight through for W).
  Groups run along the embedding dimension: one scale per token row, or per ``embed_group_size``
  columns of it. Scales are initialised by the reference rule of the scheme (max|W|/Qp for 3, 4, 8 bits).
- ``QuantHead``: the untied LM head, a ``QuantLinear`` with ``head_bits`` / ``head_group_size``.
- ``QuantTiedHead``: the LM head of a model that ties it to the embedding (MiniCPM4, SmolLM2). It
  owns no scale: it multiplies by its embedding's Ŵ (one latent weight, one scale set, used by both;
  its ``weight`` attribute is the tied Parameter itself, as transformers' tying expects).

Packed (the "packed" folder format, inference):

- ``PackedEmbedding``: ``qweight`` (codes packed as for ``PackedLinear``) + ``scales`` (storage dtype).
- ``PackedTiedHead``: the LM head reading its ``PackedEmbedding``'s Ŵ; nothing of its own is saved.

Codes are computed from the scales rounded to the storage dtype, so a packed table equals the
fake-quant table with those scales bit for bit (as for ``PackedLinear``). With ``a_bits=8`` a
quantized head fake-quantizes its input per token, as the Linear layers do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paretoq.quant.config import QuantConfig, QuantConfigError, parse_bits
from paretoq.quant.functional import (TABLE_SCHEMES, dequantize_codes, fake_quantize, fake_quantize_activation,
                                      group_label, group_width, init_scale, quantize_codes)
from paretoq.quant.linear import QuantLinear, compute_dtype
from paretoq.quant.packing import CODE_FORMATS


def check_table(what: str, name: str, dim: int, group_size: int | None) -> None:
    if group_size is not None and dim % group_size:
        raise QuantConfigError(f"{what}_group_size {group_size} does not divide the width {dim} of {name}: choose a "
                               f"divisor of {dim}, or omit {what}_group_size for one scale per row")


class QuantEmbedding(nn.Embedding):
    """An embedding table fake-quantized like a QuantLinear weight (module docstring)."""

    def _setup(self, config: QuantConfig, device=None) -> None:
        if config.embed_scheme is None:
            raise ValueError("QuantEmbedding needs a config with embed_bits below 16")
        self.quant_config = config
        self.scheme = config.embed_scheme
        self.group_size = config.embed_group_size
        groups = self.embedding_dim // group_width(self.group_size, self.embedding_dim)
        self.weight_clip_val = nn.Parameter(torch.empty(self.num_embeddings, groups, dtype=torch.float32,
                                                        device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, config: QuantConfig, name: str = "embedding",
                       init: bool = True) -> "QuantEmbedding":
        """Wrap ``emb``, reusing its weight Parameter (no copy); ``init`` sets the scales from it."""
        check_table("embed", name, emb.embedding_dim, config.embed_group_size)
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(q, attr, getattr(emb, attr))
        if q.max_norm is not None or q.sparse:
            raise QuantConfigError(f"{name}: embed_bits needs a plain embedding (no max_norm, not sparse)")
        q.weight = emb.weight
        q._setup(config, device=emb.weight.device)
        if init:
            q.reset_scale()
        return q

    # the (out, in) view of the table that the exporters and `paretoq info` share with Linear layers
    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @torch.no_grad()
    def reset_scale(self) -> None:
        self.weight_clip_val.copy_(init_scale(self.weight, self.scheme, self.group_size))

    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (num_embeddings, embedding_dim), differentiable with respect to W and the scales."""
        return fake_quantize(self.weight, self.weight_clip_val, self.scheme, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq)

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.quantized_weight())
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_bits={self.quant_config.embed_bits}, scales {group_label(self.group_size)}"


class QuantHead(QuantLinear):
    """The untied LM head: a ``QuantLinear`` whose scheme and scale layout are ``head_bits`` /
    ``head_group_size`` (``a_bits`` as for every quantized Linear)."""

    def _setup(self, config: QuantConfig, device=None) -> None:
        if config.head_scheme is None:
            raise ValueError("QuantHead needs a config with head_bits below 16")
        self.quant_config = config
        self.scheme = config.head_scheme
        self.group_size = config.head_group_size
        self.a_block = config.activation_block("lm_head", self.in_features, table=True)
        groups = self.in_features // group_width(self.group_size, self.in_features)
        self.weight_clip_val = nn.Parameter(torch.empty(self.out_features, groups, dtype=torch.float32, device=device))
        self._clear_cache()

    @classmethod
    def from_head(cls, linear: nn.Linear, config: QuantConfig, name: str = "lm_head", init: bool = True):
        check_table("head", name, linear.in_features, config.head_group_size)
        q = cls.from_linear(linear, config, name=name, init=False)
        if init:
            q.reset_scale()
        return q

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"head_bits={self.quant_config.head_bits}, scales {group_label(self.group_size)}")


def _activation(x: torch.Tensor, config) -> torch.Tensor:
    if config is None or config.a_bits != 8:
        return x
    return fake_quantize_activation(x, config.activation_block("lm_head", x.shape[-1], table=True))


class QuantTiedHead(nn.Module):
    """The LM head of a tied model: logits = x Ŵᵀ with Ŵ its ``QuantEmbedding``'s (module docstring)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "source", embedding)  # not a submodule: its tensors are saved once, there
        self.weight = embedding.weight  # the tied Parameter (transformers re-ties it when loading)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _activation(x, self.source.quant_config)
        return F.linear(x, self.source.quantized_weight(compute_dtype(x)))

    @torch.no_grad()
    def to_linear(self, embedding: nn.Embedding) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        out.weight = embedding.weight
        return out

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({self.out_features}×{self.in_features})"


def apply_keeping_scales(module: nn.Module, base_apply, fn, recurse: bool) -> None:
    """``module._apply`` for packed layers: ``.to(dtype)`` / ``.half()`` move the ``scales`` buffer but keep its
    storage dtype (scales are data, not activations); ``base_apply`` is nn.Module's own ``_apply``."""
    scales = module._buffers.pop("scales")
    try:
        base_apply(fn, recurse)
    finally:
        module._buffers["scales"] = scales
    if scales is not None:
        moved = fn(scales)
        module._buffers["scales"] = moved if moved.dtype == scales.dtype else scales.to(moved.device)


class PackedEmbedding(nn.Module):
    """An embedding table stored as packed codes + scales (module docstring); inference only.

    ``forward`` dequantizes the table (fp32, as ``PackedLinear``) and returns rows in the model's
    float dtype (that of the non-persistent ``dtype_anchor`` buffer, which follows ``.to(dtype)``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: float, group_size: int | None = None,
                 padding_idx: int | None = None, scale_dtype=torch.float16, dtype: torch.dtype | None = None,
                 device=None, a_bits: int = 16, a_block: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.a_block = a_block  # the tied head's 8-bit activation block (None = per token)
        self.bits = parse_bits(bits, "embed_bits", TABLE_SCHEMES)
        self.scheme = TABLE_SCHEMES.get(self.bits)
        if self.scheme is None:
            raise QuantConfigError(f"PackedEmbedding needs quantizing bits, got {bits!r}")
        check_table("embed", "the embedding", embedding_dim, group_size)
        self.group_size, self.a_bits = group_size, a_bits
        self.code_format = f"{self.scheme.code_bits}bit"
        groups = embedding_dim // group_width(group_size, embedding_dim)
        numel = num_embeddings * embedding_dim
        self.register_buffer("qweight", torch.zeros(CODE_FORMATS[self.code_format].nbytes(numel), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, groups, dtype=scale_dtype, device=device))
        self.register_buffer("dtype_anchor", torch.empty(0, dtype=dtype or torch.get_default_dtype(), device=device),
                             persistent=False)

    in_features = QuantEmbedding.in_features
    out_features = QuantEmbedding.out_features

    @classmethod
    @torch.no_grad()
    def from_quant_embedding(cls, q: QuantEmbedding, scale_dtype=torch.float16,
                             dtype: torch.dtype | None = None) -> "PackedEmbedding":
        scales = q.weight_clip_val.detach().to(scale_dtype)
        codes = quantize_codes(q.weight.detach(), scales.float(), q.scheme)
        return cls.from_codes(codes, scales, bits=q.quant_config.embed_bits, group_size=q.group_size,
                              padding_idx=q.padding_idx, dtype=dtype or q.weight.dtype, a_bits=q.quant_config.a_bits,
                              a_block=q.quant_config.activation_block("lm_head", q.embedding_dim, table=True))

    @classmethod
    @torch.no_grad()
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, *, bits, group_size, padding_idx=None,
                   dtype=None, a_bits: int = 16, a_block: int | None = None) -> "PackedEmbedding":
        n, dim = codes.shape
        p = cls(n, dim, bits=bits, group_size=group_size, padding_idx=padding_idx, scale_dtype=scales.dtype,
                dtype=dtype, device=codes.device, a_bits=a_bits, a_block=a_block)
        p.qweight = CODE_FORMATS[p.code_format].pack(codes.to(torch.uint8))
        p.scales = scales.detach().clone()
        return p

    def repacked(self, scale_dtype=None) -> "PackedEmbedding":
        scales = self.scales if scale_dtype is None else self.scales.to(scale_dtype)
        return type(self).from_codes(self.codes(), scales, bits=self.bits, group_size=self.group_size,
                                     padding_idx=self.padding_idx, dtype=self.dtype_anchor.dtype, a_bits=self.a_bits,
                                     a_block=self.a_block)

    def codes(self) -> torch.Tensor:
        numel = self.num_embeddings * self.embedding_dim
        return CODE_FORMATS[self.code_format].unpack(self.qweight, numel).reshape(self.num_embeddings,
                                                                                  self.embedding_dim)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes(), self.scales, self.scheme, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        codes = self.codes()[rows]  # only the rows asked for are dequantized (per-row/group math: same bits)
        out = dequantize_codes(codes, self.scales[rows], self.scheme, dtype=self.dtype_anchor.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` keeps the scales in their storage dtype (as ``PackedLinear``)."""
        apply_keeping_scales(self, super()._apply, fn, recurse)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, embed_bits={self.bits}, codes={self.code_format}, "
                f"scales={str(self.scales.dtype).removeprefix('torch.')} {group_label(self.group_size)}")


class PackedTiedHead(nn.Module):
    """The LM head of a tied packed model: logits = x Ŵᵀ with Ŵ its ``PackedEmbedding``'s."""

    def __init__(self, embedding: PackedEmbedding):
        super().__init__()
        object.__setattr__(self, "source", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source.a_bits == 8:
            x = fake_quantize_activation(x, self.source.a_block)
        return F.linear(x, self.source.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"tied to the packed embedding ({self.out_features}×{self.in_features})"
