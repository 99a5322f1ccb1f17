"""`PackedLinear` (integer codes + scales in registered buffers) and the model surgery around it.

A packed layer stores what the fake-quant layer computes, Ŵ = α̃ · levels[code], as

- ``qweight``: uint8 (P,), the codes of the (out, in) weight flattened row-major and packed with
  :mod:`paretoq.quant.packing` ("1bit", "2bit", "3bit", "4bit"; ternary: "2bit" or "base3");
- ``scales``: (out, groups) in fp16 (default), bf16 or fp32 — α, one per row or per group;
- ``bias``: (out,) when the Linear has one.

Codes are computed with the scales already rounded to the storage dtype, so a packed layer equals
the fake-quant layer whose ``weight_clip_val`` is rounded to that dtype, bit for bit in fp32.
Saving and loading a packed folder: :mod:`paretoq.export.packed`; the layout: ``docs/formats.md``.

Inference. In fp32 (and any dtype but bf16) the forward dequantizes the codes and calls
``F.linear``: exact, but it rebuilds every weight at every call. In bf16 on CPU it uses torch's
int4 weight-only kernel (``aten._weight_int4pack_mm_for_cpu``), which reads 4-bit weights and
bf16 group scales directly: every scheme's levels are integer multiples of one unit u (binary
u = 1, ternary u = 2/3, 2-bit u = 1/4, 3/4-bit u = 1), so level = u·v with v ∈ [−8, 7], stored
as v + 8 in 4 bits, with scale α̃·u and zero 0. The kernel layout is built from the codes at the
first bf16 forward and cached on the module (4 bits per weight + bf16 scales, not persisted).
Its speed against bf16 ``F.linear``: ``benchmarks/decode_speed.py``. Layers it cannot take (out_features not a multiple of 16, or no kernel
group size 32/64/128/256 dividing the scale group) fall back to dequantize + matmul.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paretoq.errors import UserError
from paretoq.quant.config import QUANT_METHOD, QuantConfig, QuantConfigError, parse_bits
from paretoq.quant.functional import (SCALE_EPS, TABLE_SCHEMES, Scheme, dequantize_codes,
                                      fake_quantize_activation, group_label, group_width, quantize_codes)
from paretoq.quant.embedding import (PackedEmbedding, PackedTiedHead, QuantEmbedding, QuantTiedHead,
                                     apply_keeping_scales)
from paretoq.quant.linear import QuantLinear
from paretoq.quant.swap import selected_linears, set_module, table_modules
from paretoq.quant.packing import CODE_FORMATS

logger = logging.getLogger(__name__)

TERNARY_FORMATS = ("2bit", "base3")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # the group sizes the CPU int4 kernel accepts


def resolve_dtype(value: Any, what: str = "scale_dtype") -> torch.dtype:
    """torch.float16 / "fp16" / "float16" → torch.float16 (and bf16, fp32)."""
    if isinstance(value, torch.dtype):
        if value in SCALE_DTYPES.values():
            return value
    else:
        name = str(value).removeprefix("torch.")
        name = _DTYPE_ALIASES.get(name, name)
        if name in SCALE_DTYPES:
            return SCALE_DTYPES[name]
    raise QuantConfigError(f"{what} {value!r} is not supported: use fp16, bf16 or fp32")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def code_format(scheme: Scheme, ternary_format: str = "2bit") -> str:
    """The packing format of a scheme's codes: "<code_bits>bit", or "base3" for ternary if asked."""
    if ternary_format not in TERNARY_FORMATS:
        raise QuantConfigError(f"ternary_format {ternary_format!r} is unknown: use one of {', '.join(TERNARY_FORMATS)}")
    if scheme.n_levels == 3 and ternary_format == "base3":
        return "base3"
    return f"{scheme.code_bits}bit"


def int4_grid(scheme: Scheme) -> tuple[tuple[int, ...], float] | None:
    """(k, step) of ``scheme.integer_grid`` when every k fits the int4 kernel's [−8, 7], else None."""
    step, ints = scheme.integer_grid
    return (ints, step) if min(ints) >= -8 and max(ints) <= 7 else None


def _kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class PackedLinear(nn.Module):
    """A Linear layer whose weight is stored as packed integer codes and scales (inference only).

    Buffers (saved in ``state_dict``): ``qweight`` uint8 (P,), ``scales`` (out, groups) in the
    scale dtype, ``bias`` (out,) or None. Attributes: ``in_features``, ``out_features``, ``bits``
    (1, 1.58, 2, 3, 4), ``group_size`` (None = per row), ``code_format`` ("1bit", "2bit", "3bit",
    "4bit" or "base3"). ``.to(dtype)`` leaves the scales in their storage dtype.
    """

    use_kernel: bool = True  # set False (on the class or an instance) to force dequantize + matmul

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: float,
                 group_size: int | None = None, ternary_format: str = "2bit", scale_dtype=torch.float16,
                 dtype: torch.dtype | None = None, device=None, a_bits: int = 16, a_block: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.a_bits = a_bits  # 8: the input is fake-quantized to 8 bits, as in training
        self.a_block = a_block  # ... per token (None) or per block of a_block features
        self.bits = parse_bits(bits, "bits", TABLE_SCHEMES)  # 8 only for an LM head (head_bits 8)
        self.scheme = TABLE_SCHEMES.get(self.bits)
        if self.scheme is None:
            raise QuantConfigError(f"PackedLinear needs w_bits 1, 1.58, 2, 3 or 4, got {bits!r}")
        if group_size is not None and in_features % group_size:
            raise QuantConfigError(f"group_size {group_size} does not divide in_features {in_features}")
        self.group_size = group_size
        self.code_format = code_format(self.scheme, ternary_format)
        groups = in_features // group_width(group_size, in_features)
        numel = in_features * out_features
        self.register_buffer("qweight", torch.zeros(CODE_FORMATS[self.code_format].nbytes(numel), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=resolve_dtype(scale_dtype),
                                                  device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(),
                                                     device=device))
        else:
            self.register_buffer("bias", None)
        self._kernel: tuple | None = None
        self._kernel_key: tuple | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, bits: float,
                   group_size: int | None, ternary_format: str = "2bit", a_bits: int = 16,
                   a_block: int | None = None) -> "PackedLinear":
        """Pack ``codes`` (out, in) uint8 with ``scales`` (out, groups), kept in their dtype."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bias=bias is not None, bits=bits, group_size=group_size,
                    ternary_format=ternary_format, scale_dtype=scales.dtype,
                    dtype=None if bias is None else bias.dtype, device=codes.device, a_bits=a_bits, a_block=a_block)
        if tuple(scales.shape) != tuple(layer.scales.shape):
            raise ValueError(f"scales of shape {tuple(scales.shape)} do not fit a {out_features}×{in_features} "
                             f"weight with group_size {group_size}: expected {tuple(layer.scales.shape)}")
        layer.qweight = CODE_FORMATS[layer.code_format].pack(codes.to(torch.uint8))
        layer.scales = scales.detach().clone()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q: QuantLinear, scale_dtype=torch.float16, ternary_format: str = "2bit",
                          bias_dtype: torch.dtype | None = None) -> "PackedLinear":
        """Pack a fake-quant layer: scales rounded to ``scale_dtype`` first, codes from those scales."""
        scales = q.weight_clip_val.detach().to(resolve_dtype(scale_dtype))
        codes = quantize_codes(q.weight.detach(), scales.float(), q.scheme)
        bias = None if q.bias is None else q.bias.detach().to(bias_dtype or q.bias.dtype)
        return cls.from_codes(codes, scales, bias, bits=q.scheme.bits, group_size=q.group_size,
                              ternary_format=ternary_format, a_bits=q.quant_config.a_bits, a_block=q.a_block)

    @torch.no_grad()
    def repacked(self, scale_dtype=None, ternary_format: str | None = None,
                 bias_dtype: torch.dtype | None = None) -> "PackedLinear":
        """This layer in another scale dtype / ternary format (the codes are kept)."""
        fmt = ternary_format or ("base3" if self.code_format == "base3" else "2bit")
        scales = self.scales if scale_dtype is None else self.scales.to(resolve_dtype(scale_dtype))
        bias = None if self.bias is None else self.bias.to(bias_dtype or self.bias.dtype)
        return type(self).from_codes(self.codes(), scales, bias, bits=self.bits, group_size=self.group_size,
                                     ternary_format=fmt, a_bits=self.a_bits, a_block=self.a_block)

    # -- reading the weight --------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The integer codes, uint8 (out, in)."""
        numel = self.in_features * self.out_features
        return CODE_FORMATS[self.code_format].unpack(self.qweight, numel).reshape(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = α̃ · levels[codes] (out, in), computed in fp32 and cast to ``dtype``."""
        return dequantize_codes(self.codes(), self.scales, self.scheme, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits == 8:
            x = fake_quantize_activation(x, self.a_block)
        if self._kernel_applies(x):
            return self._kernel_forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    # -- the int4 CPU kernel -------------------------------------------------------------------
    def kernel_group_size(self) -> int | None:
        """The int4 kernel's group size for this layer, or None when the kernel cannot run it."""
        if not _kernel_available() or self.out_features % 16 or int4_grid(self.scheme) is None:
            return None
        group = group_width(self.group_size, self.in_features)
        return next((g for g in KERNEL_GROUP_SIZES if group % g == 0), None)

    def kernel_bytes(self) -> int:
        """Bytes of the cached int4 kernel layout (0 when the layer does not use the kernel)."""
        g = self.kernel_group_size()
        if g is None:
            return 0
        return self.out_features * self.in_features // 2 + (self.in_features // g) * self.out_features * 2 * 2

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled()) and self.kernel_group_size() is not None)

    @torch.no_grad()
    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version,
               self.qweight.device)
        if self._kernel is not None and self._kernel_key == key:
            return self._kernel
        g = self.kernel_group_size()
        ints, unit = int4_grid(self.scheme)
        lut = torch.tensor(ints, dtype=torch.int32, device=self.qweight.device) + 8
        q4 = lut[self.codes().long()]  # (out, in) int32 in 0..15: level = unit · (q4 − 8)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        scale = self.scales.float().clamp_min(SCALE_EPS) * unit  # (out, groups)
        scale = scale.repeat_interleave(group_width(self.group_size, self.in_features) // g, dim=1).t()  # (in/g, out)
        scale_zero = torch.stack([scale, torch.zeros_like(scale)], dim=-1).to(torch.bfloat16).contiguous()
        self._kernel, self._kernel_key = (packed, scale_zero, g), key
        return self._kernel

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, scale_zero, g = self._kernel_weights()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), packed, g,
                                                       scale_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # -- nn.Module plumbing --------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` move the scales but keep their storage dtype (they are data)."""
        apply_keeping_scales(self, super()._apply, fn, recurse)
        self._kernel = self._kernel_key = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w_bits={self.bits}, codes={self.code_format}, scales={dtype_name(self.scales.dtype)} "
                f"{group_label(self.group_size)}" + (", a_bits=8" if self.a_bits == 8 else "") +
                (f" per block of {self.a_block}" if self.a_bits == 8 and self.a_block else ""))


# -- model surgery ---------------------------------------------------------------------------
def packed_settings(quantization_config: Any) -> tuple[torch.dtype, str]:
    """(scale dtype, ternary format) recorded in a packed folder's ``quantization_config``."""
    d = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else dict(quantization_config or {})
    scale_dtype = resolve_dtype(d.get("scale_dtype", "float16"), "quantization_config.scale_dtype")
    ternary = d.get("ternary_format", "2bit")
    if ternary not in TERNARY_FORMATS:
        raise QuantConfigError(f"quantization_config.ternary_format {ternary!r} is unknown: "
                               f"expected one of {', '.join(TERNARY_FORMATS)}")
    return scale_dtype, ternary


def replace_with_packed(model: nn.Module, quant_config: QuantConfig | dict, *, scale_dtype=None,
                        ternary_format: str | None = None) -> list[str]:
    """Swap the Linear layers ``quant_config`` selects for empty ``PackedLinear`` (e.g. on meta).

    Used by ``from_pretrained`` before the packed buffers are loaded. The scale dtype and the
    ternary format come from the arguments or else from ``model.config.quantization_config``.
    Returns the names of the swapped layers.
    """
    if isinstance(quant_config, dict):
        recorded = packed_settings(quant_config)
        quant_config = QuantConfig.from_dict(quant_config)
    else:
        recorded = packed_settings(getattr(getattr(model, "config", None), "quantization_config", None))
    scale_dtype = recorded[0] if scale_dtype is None else resolve_dtype(scale_dtype)
    ternary_format = ternary_format or recorded[1]
    if not quant_config.enabled:
        raise QuantConfigError("a packed model needs w_bits 1, 1.58, 2, 3 or 4")
    targets = selected_linears(model, quant_config)
    for name, linear in targets:
        quant_config.check_layer(name, linear.in_features)
    for name, linear in targets:
        bias = linear.bias
        layer = quant_config.for_layer(name)
        set_module(model, name, PackedLinear(
            linear.in_features, linear.out_features, bias=bias is not None, bits=layer.w_bits,
            group_size=layer.group_size, ternary_format=ternary_format, scale_dtype=scale_dtype,
            dtype=None if bias is None else bias.dtype, device=linear.weight.device, a_bits=layer.a_bits,
            a_block=layer.activation_block(name, linear.in_features)))
    return [n for n, _ in targets] + replace_tables_with_packed(model, quant_config, scale_dtype)


def packed_quantization_config(quant_config: QuantConfig, scale_dtype, ternary_format: str) -> dict[str, Any]:
    """``config.json["quantization_config"]`` of a packed folder."""
    d = quant_config.to_dict(format="packed")
    version = d.pop("version")
    d.update(scale_dtype=dtype_name(resolve_dtype(scale_dtype)), ternary_format=ternary_format, version=version)
    return d


def quant_config_of(model: nn.Module) -> QuantConfig:
    """The model's QuantConfig: the one its config records (with the per-layer overrides), else the
    first QuantLinear's (a model quantized by hand)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        d = qc.to_dict() if hasattr(qc, "to_dict") else qc
        if isinstance(d, dict) and d.get("quant_method", QUANT_METHOD) == QUANT_METHOD:
            return QuantConfig.from_dict(d)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            return m.quant_config
    for m in model.modules():
        if isinstance(m, PackedLinear):
            return QuantConfig(w_bits=m.bits, group_size=m.group_size)
    raise UserError("the model has no quantized layers: quantize it (paretoq train --w_bits ..., or "
                    "paretoq.quantize_model) before a packed export")


def pack_model(model: nn.Module, scale_dtype=torch.float16, ternary_format: str = "2bit") -> list[str]:
    """Convert every ``QuantLinear`` of ``model`` to a ``PackedLinear``, in place; returns their names."""
    qc = quant_config_of(model)
    names = []
    tables = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, PackedLinear.from_quant_linear(module, scale_dtype, ternary_format))
            names.append(name)
        elif isinstance(module, QuantEmbedding):
            tables[module] = PackedEmbedding.from_quant_embedding(module, resolve_dtype(scale_dtype))
            set_module(model, name, tables[module])
            names.append(name)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantTiedHead):
            set_module(model, name, PackedTiedHead(tables[module.source]))
            _untie(model)
    if hasattr(model, "config"):
        model.config.quantization_config = packed_quantization_config(qc, scale_dtype, ternary_format)
    return names


def _untie(model: nn.Module) -> None:
    """Drop transformers' lm_head → embedding tie: a packed tied head owns no ``weight`` to tie (it reads
    the packed embedding's Ŵ), and re-tying would look for an ``embed_tokens.weight`` that no longer exists."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.clear()


def replace_tables_with_packed(model: nn.Module, quant_config: QuantConfig, scale_dtype) -> list[str]:
    """Swap the embedding / LM head that ``embed_bits`` / ``head_bits`` quantize for empty packed modules
    (``from_pretrained`` of a packed folder, before the buffers load); returns their names."""
    emb_name, head_name, tied = table_modules(model, quant_config)
    names = []
    if emb_name is not None:
        emb = model.get_submodule(emb_name)
        packed = PackedEmbedding(emb.num_embeddings, emb.embedding_dim, bits=quant_config.embed_bits,
                                 group_size=quant_config.embed_group_size,
                                 padding_idx=emb.padding_idx, scale_dtype=scale_dtype, dtype=emb.weight.dtype,
                                 device=emb.weight.device, a_bits=quant_config.a_bits,
                                 a_block=quant_config.activation_block(emb_name, emb.embedding_dim, table=True))
        set_module(model, emb_name, packed)
        names.append(emb_name)
        if tied:
            set_module(model, head_name, PackedTiedHead(packed))
            _untie(model)
    if head_name is not None and not tied:
        head = model.get_submodule(head_name)
        bias = head.bias
        set_module(model, head_name, PackedLinear(
            head.in_features, head.out_features, bias=bias is not None, bits=quant_config.head_bits,
            group_size=quant_config.head_group_size, scale_dtype=scale_dtype,
            dtype=None if bias is None else bias.dtype, device=head.weight.device, a_bits=quant_config.a_bits,
            a_block=quant_config.activation_block(head_name, head.in_features, table=True)))
        names.append(head_name)
    return names

