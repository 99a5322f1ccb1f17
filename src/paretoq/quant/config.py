"""`QuantConfig`: what to quantize and how, validated on creation.

Bits are spelled as users say them — 1, 1.58, 2, 3, 4; 16 or 32 mean "off"; the seed's ``0`` is
accepted as ternary (1.58). The config resolves the spelling to a scheme once (``config.scheme``);
nothing downstream looks at the number again.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from paretoq.errors import QuantConfigError
from paretoq.quant.functional import SCHEMES, TABLE_SCHEMES, Scheme
from paretoq.quant.scale_init import SCALE_INITS

FORMAT_VERSION = 2
# Version 2 adds embed_bits / embed_group_size / head_bits / head_group_size / a_bits. A config that uses
# none of them is written as version 1 (what it always was), so only the folders that need the new
# fields are refused by a paretoq that predates them, instead of being run without them.
_V1 = 1
QUANT_METHOD = "paretoq"
OFF_BITS = (16, 32)

# Default selection: every nn.Linear that lives inside a numbered block of a ModuleList
# (``model.layers.3.self_attn.q_proj``) — the decoder layers of any HF causal LM — and never
# the LM head or the embeddings. For Llama and MiniCPM4 that is exactly the reference's seven
# projections (q, k, v, o, gate, up, down).
DEFAULT_INCLUDE = (r"\.\d+\.",)
DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"embed")


def parse_bits(value: Any, what: str = "w_bits", schemes: dict = SCHEMES) -> float:
    """Normalise a user's bit width: returns 1, 1.58, 2, 3, 4 or 16 (off); with ``schemes=TABLE_SCHEMES``
    (embeddings and LM head) 8 too.

    >>> parse_bits("1.58"), parse_bits(0), parse_bits("32")
    (1.58, 1.58, 16)
    """
    names = ", ".join(str(int(b) if float(b).is_integer() else b) for b in schemes)
    allowed = f"{names} (or 16 / 32 for no quantization; 0 is accepted as 1.58)"
    try:
        bits = float(value)
    except (TypeError, ValueError):
        raise QuantConfigError(f"{what} {value!r} is not a number: use one of {allowed}") from None
    if bits == 0:
        return 1.58
    if bits in OFF_BITS:
        return 16
    for known in schemes:
        if abs(bits - known) < 1e-9:
            return int(known) if float(known).is_integer() else known
    raise QuantConfigError(f"{what} {value} is not supported: use one of {allowed}")


def _check_group_size(value: Any, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise QuantConfigError(f"{what} must be a positive integer (got {value!r}); omit it for one scale per "
                               "output row")


@dataclass
class QuantConfig:
    """How to quantize a model's weights.

    Args:
        w_bits: 1, 1.58, 2, 3, 4; 16 or 32 = no quantization; 0 = 1.58 (the seed's spelling).
        group_size: ``None`` = one scale per output row (the reference); an integer g = one scale
            per g consecutive input columns (g must divide every selected layer's in_features).
        include: regular expressions (``re.search`` on the module's qualified name); a Linear is
            quantized when it matches one of them and none of ``exclude``.
        exclude: regular expressions that veto a match.
        scale_init: "reference" (ParetoQ: mean|W| at 1 bit, max|W| at 1.58 and 2, max|W|/Qp at
            3 and 4 bits, per row or per group); "mse" (per row/group search of α = r·α_ref
            minimising ‖W − Ŵ‖²); "mse_act" (the same, each input column weighted by E[x²] from
            calibration data — pass ``calibration_data`` to ``quantize_model``); "gptq" (mse_act
            scales, then GPTQ-style error feedback rewrites the latent weights; calibration data
            too). See :mod:`paretoq.quant.scale_init`.

    Embedding table, LM head and activations (separate from the Linear selection above; each off
    by default, and then absent from ``to_dict()`` so older folders read and write the same):
        embed_bits: bits of the input embedding (``get_input_embeddings()``): 1, 1.58, 2, 3, 4 or 8
            (8 = the integer grid −128…127); 16 = not quantized. Reference scale init, learnable
            scale, straight-through gradient, as for the Linear layers (:mod:`paretoq.quant.embedding`).
        embed_group_size: columns per scale of the embedding (None = one per row, i.e. per token).
        head_bits / head_group_size: the same for the LM head (``get_output_embeddings()``). When the
            model ties them (MiniCPM4, SmolLM2) there is one matrix: it is quantized once (one latent
            weight, one scale set, used by both) with ``embed_bits`` (or ``head_bits`` if only that
            is given); both given must then agree.
        a_bits: 8 = per-token absmax 8-bit fake quantization of every quantized Linear's input
            (``functional.fake_quantize_activation``); 16 = off.
    """

    w_bits: float = 16
    group_size: int | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    scale_init: str = "reference"
    scheme: Scheme | None = field(init=False, repr=False, compare=False)
    # -- embeddings, LM head, activations (issue #30) ------------------------------------------
    embed_bits: float = 16
    embed_group_size: int | None = None
    head_bits: float = 16
    head_group_size: int | None = None
    a_bits: int = 16

    def __post_init__(self):
        self.w_bits = parse_bits(self.w_bits)
        self.scheme = SCHEMES.get(self.w_bits)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise QuantConfigError(
                    f"group_size must be a positive integer (got {self.group_size!r}); "
                    "omit it for one scale per output row"
                )
        self.embed_bits = parse_bits(self.embed_bits, "embed_bits", TABLE_SCHEMES)
        self.head_bits = parse_bits(self.head_bits, "head_bits", TABLE_SCHEMES)
        _check_group_size(self.embed_group_size, "embed_group_size")
        _check_group_size(self.head_group_size, "head_group_size")
        try:
            a_bits = float(self.a_bits)
        except (TypeError, ValueError):
            a_bits = None
        if a_bits not in (8, *OFF_BITS):
            raise QuantConfigError(f"a_bits {self.a_bits!r} is not supported: use 8 (per-token 8-bit activations) "
                                   "or 16 (off)")
        self.a_bits = 16 if a_bits in OFF_BITS else 8
        if (self.embed_bits != 16 or self.head_bits != 16 or self.a_bits != 16) and self.scheme is None:
            raise QuantConfigError("embed_bits, head_bits and a_bits apply to a quantized model: set w_bits to "
                                   "1, 1.58, 2, 3 or 4 as well")
        if self.scale_init not in SCALE_INITS:
            raise QuantConfigError(f"scale_init {self.scale_init!r} is unknown: use one of {', '.join(SCALE_INITS)}")
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise QuantConfigError(f"module pattern {pattern!r} is not a valid regular expression: {e}") from None

    @property
    def enabled(self) -> bool:
        return self.scheme is not None

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` (a Linear) is to be quantized."""
        return any(re.search(p, name) for p in self.include) and not any(re.search(p, name) for p in self.exclude)

    def same_layers(self, other: "QuantConfig") -> bool:
        """Whether a model quantized by ``other`` has the layers and tensors this config makes: same
        bits, scale layout and selection, embedding/head/activation settings (how the scales were
        initialised does not matter)."""
        return (self.w_bits, self.group_size, self.include, self.exclude, *self.table_settings()) == \
            (other.w_bits, other.group_size, other.include, other.exclude, *other.table_settings())

    def describe(self) -> str:
        """"w_bits=2 group_size=None", plus the embedding/head/activation settings that are on."""
        extra = "".join(f" {k}={getattr(self, k)}" for k, off in _TABLE_DEFAULTS.items() if getattr(self, k) != off)
        return f"w_bits={self.w_bits} group_size={self.group_size}{extra}"

    def table_settings(self) -> tuple:
        """(embed_bits, embed_group_size, head_bits, head_group_size, a_bits): what a resumed run must share."""
        return self.embed_bits, self.embed_group_size, self.head_bits, self.head_group_size, self.a_bits

    @property
    def embed_scheme(self) -> Scheme | None:
        return TABLE_SCHEMES.get(self.embed_bits)

    @property
    def head_scheme(self) -> Scheme | None:
        return TABLE_SCHEMES.get(self.head_bits)

    def check_layer(self, name: str, in_features: int) -> None:
        if self.group_size is not None and in_features % self.group_size:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f" (e.g. {', '.join(map(str, divisors))})" if divisors else ""
            raise QuantConfigError(
                f"group_size {self.group_size} does not divide in_features {in_features} of layer {name}: "
                f"choose a divisor of {in_features}{hint}, or omit group_size for per-row scales"
            )

    def to_dict(self, format: str = "fake") -> dict[str, Any]:
        """The ``config.json["quantization_config"]`` entry of a saved model folder."""
        d = {k: v for k, v in asdict(self).items() if k != "scheme" and k not in _TABLE_DEFAULTS}
        d.update({k: getattr(self, k) for k, off in _TABLE_DEFAULTS.items() if getattr(self, k) != off})
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        version = FORMAT_VERSION if any(getattr(self, k) != off for k, off in _TABLE_DEFAULTS.items()) else _V1
        return {"quant_method": QUANT_METHOD, **d, "format": format, "version": version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if d.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise QuantConfigError(f"quantization_config.quant_method is {d.get('quant_method')!r}, not {QUANT_METHOD!r}")
        version = d.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise QuantConfigError(
                f"quantization_config.version {version!r} is not supported by this paretoq "
                f"(it reads version {FORMAT_VERSION}): upgrade paretoq or re-export the model"
            )
        kwargs = {k: d[k] for k in ("w_bits", "group_size", "include", "exclude", "scale_init", *_TABLE_DEFAULTS)
                  if k in d}
        return cls(**kwargs)


_TABLE_DEFAULTS = {"embed_bits": 16, "embed_group_size": None, "head_bits": 16, "head_group_size": None, "a_bits": 16}
"""The embedding/head/activation fields and their "off" values: written to ``quantization_config``
only when set, so the entries of models without them are what they were before these fields."""
