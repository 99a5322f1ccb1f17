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
from paretoq.quant.functional import SCHEMES, Scheme
from paretoq.quant.scale_init import SCALE_INITS

FORMAT_VERSION = 1
QUANT_METHOD = "paretoq"
OFF_BITS = (16, 32)

# Default selection: every nn.Linear that lives inside a numbered block of a ModuleList
# (``model.layers.3.self_attn.q_proj``) — the decoder layers of any HF causal LM — and never
# the LM head or the embeddings. For Llama and MiniCPM4 that is exactly the reference's seven
# projections (q, k, v, o, gate, up, down).
DEFAULT_INCLUDE = (r"\.\d+\.",)
DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"embed")


def parse_bits(value: Any) -> float:
    """Normalise a user's bit width: returns 1, 1.58, 2, 3, 4 or 16 (off).

    >>> parse_bits("1.58"), parse_bits(0), parse_bits("32")
    (1.58, 1.58, 16)
    """
    allowed = "1, 1.58, 2, 3, 4 (or 16 / 32 for no quantization; 0 is accepted as 1.58)"
    try:
        bits = float(value)
    except (TypeError, ValueError):
        raise QuantConfigError(f"w_bits {value!r} is not a number: use one of {allowed}") from None
    if bits == 0:
        return 1.58
    if bits in OFF_BITS:
        return 16
    for known in SCHEMES:
        if abs(bits - known) < 1e-9:
            return int(known) if float(known).is_integer() else known
    raise QuantConfigError(f"w_bits {value} is not supported: use one of {allowed}")


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
    """

    w_bits: float = 16
    group_size: int | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    scale_init: str = "reference"
    scheme: Scheme | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.w_bits = parse_bits(self.w_bits)
        self.scheme = SCHEMES.get(self.w_bits)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
                raise QuantConfigError(
                    f"group_size must be a positive integer (got {self.group_size!r}); "
                    "omit it for one scale per output row"
                )
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
        bits, scale layout and selection (how the scales were initialised does not matter)."""
        return (self.w_bits, self.group_size, self.include, self.exclude) == \
            (other.w_bits, other.group_size, other.include, other.exclude)

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
        d = {k: v for k, v in asdict(self).items() if k != "scheme"}
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return {"quant_method": QUANT_METHOD, **d, "format": format, "version": FORMAT_VERSION}

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
        kwargs = {k: d[k] for k in ("w_bits", "group_size", "include", "exclude", "scale_init") if k in d}
        return cls(**kwargs)
