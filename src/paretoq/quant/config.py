"""`QuantConfig`: what to quantize and how, validated on creation.

Bits are spelled as users say them — 1, 1.58, 2, 3, 4; 16 or 32 mean "off"; the seed's ``0`` is
accepted as ternary (1.58). The config resolves the spelling to a scheme once (``config.scheme``);
nothing downstream looks at the number again.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from paretoq.errors import QuantConfigError
from paretoq.quant.functional import SCHEMES, TABLE_SCHEMES, Scheme
from paretoq.quant.scale_init import SCALE_INITS

FORMAT_VERSION = 2
# Version 2 adds embed_bits / embed_group_size / head_bits / head_group_size / a_bits and per-layer overrides. A
# config that uses none of them is written as version 1 (what it always was), so only the folders that need the new
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


# --- per-layer overrides (mixed precision; issue #31) -----------------------------------------------


@dataclass(frozen=True)
class LayerOverride:
    """One entry of ``QuantConfig.overrides``: layers whose qualified name matches ``pattern``
    (``re.search``) get ``w_bits`` (16 = "off": the layer stays a plain Linear) and ``group_size``."""

    pattern: str
    w_bits: float
    group_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "w_bits": self.w_bits, "group_size": self.group_size}


def _check_group_size(group_size: Any, where: str = "group_size") -> None:
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise QuantConfigError(
                f"{where} must be a positive integer (got {group_size!r}); omit it for one scale per output row")


def _override(entry: Any, default_group: int | None, index: int) -> LayerOverride:
    """An override from a dict {pattern, w_bits, group_size?} (a missing group_size = the default's),
    a (pattern, w_bits[, group_size]) sequence or a LayerOverride."""
    where = f"overrides[{index}]"
    if isinstance(entry, LayerOverride):
        pattern, bits, group = entry.pattern, entry.w_bits, entry.group_size
    elif isinstance(entry, dict):
        unknown = sorted(set(entry) - {"pattern", "w_bits", "group_size"})
        if unknown or "pattern" not in entry or "w_bits" not in entry:
            raise QuantConfigError(f"{where} must be a mapping with pattern, w_bits and optionally group_size"
                                   + (f" (unknown key {unknown[0]!r})" if unknown else ""))
        pattern, bits, group = entry["pattern"], entry["w_bits"], entry.get("group_size", default_group)
    elif isinstance(entry, (list, tuple)) and len(entry) in (2, 3):
        pattern, bits, group = entry[0], entry[1], entry[2] if len(entry) == 3 else default_group
    else:
        raise QuantConfigError(f"{where} must be a mapping {{pattern, w_bits, group_size}}, got {entry!r}")
    if not isinstance(pattern, str) or not pattern:
        raise QuantConfigError(f"{where}.pattern must be a non-empty regular expression, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise QuantConfigError(f"{where}.pattern {pattern!r} is not a valid regular expression: {e}") from None
    if isinstance(bits, str) and bits.strip().lower() == "off":
        bits = 16
    _check_group_size(group, f"{where}.group_size")
    return LayerOverride(pattern, parse_bits(bits), group)


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
        overrides: per-layer settings (mixed precision), an ordered list of ``LayerOverride`` (or
            dicts ``{pattern, w_bits, group_size}``): a selected layer takes the first override whose
            pattern it matches (``re.search``), else the defaults above; w_bits 16 or "off" leaves
            that layer unquantized. ``for_layer(name)`` resolves one layer; everything that needs a
            layer's bits or scale layout asks it. A dict without group_size takes the default's.

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
        a_bits: 8 = absmax 8-bit fake quantization of every quantized Linear's input
            (``functional.fake_quantize_activation``); 16 = off.
        a_group_size: where a_bits=8 takes max|x|: None = over each token (BitNet b1.58); N = over each
            run of N input features (32 = llama.cpp's Q8_0 blocks, 256 = Q8_K); "gguf" = per layer, the
            block llama.cpp uses with the type paretoq's GGUF export writes for it
            (``functional.gguf_activation_block``: 256 for 2/3-bit K-quant layers, else 32).
    """

    w_bits: float = 16
    group_size: int | None = None
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    scale_init: str = "reference"
    overrides: tuple[LayerOverride, ...] = ()
    scheme: Scheme | None = field(init=False, repr=False, compare=False)
    # -- embeddings, LM head, activations (issue #30) ------------------------------------------
    embed_bits: float = 16
    embed_group_size: int | None = None
    head_bits: float = 16
    head_group_size: int | None = None
    a_bits: int = 16
    a_group_size: int | str | None = None

    def __post_init__(self):
        self.w_bits = parse_bits(self.w_bits)
        self.scheme = SCHEMES.get(self.w_bits)
        _check_group_size(self.group_size)
        if isinstance(self.overrides, (str, bytes, dict)) or not hasattr(self.overrides, "__iter__"):
            raise QuantConfigError(f"overrides must be a list of {{pattern, w_bits, group_size}}, got {self.overrides!r}")
        self.overrides = tuple(_override(o, self.group_size, i) for i, o in enumerate(self.overrides))
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
        self.a_group_size = _activation_group(self.a_group_size)
        if self.a_group_size is not None and self.a_bits != 8:
            raise QuantConfigError("a_group_size applies to 8-bit activations: set a_bits to 8 as well")
        if (self.embed_bits != 16 or self.head_bits != 16 or self.a_bits != 16) and not self.enabled:
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
        """Whether any layer gets quantized (the default's bits, or an override's)."""
        return self.scheme is not None or any(o.w_bits != 16 for o in self.overrides)

    @property
    def mixed(self) -> bool:
        """Whether layers may differ in bits or scale layout (there are overrides)."""
        return bool(self.overrides)

    def schemes(self) -> list[Scheme]:
        """Every scheme some layer may use (the default's and the overrides'), without repeats."""
        out = [SCHEMES[b] for b in dict.fromkeys([self.w_bits, *(o.w_bits for o in self.overrides)]) if b in SCHEMES]
        return out

    def for_layer(self, name: str) -> "QuantConfig":
        """The settings of the layer called ``name``: a config without overrides whose w_bits and
        group_size are the first matching override's (else the defaults). The selection and the
        scale init are this config's."""
        for o in self.overrides:
            if re.search(o.pattern, name):
                return self._layer(o.w_bits, o.group_size)
        if not self.overrides:
            return self
        return self._layer(self.w_bits, self.group_size)

    def _layer(self, w_bits: float, group_size: int | None) -> "QuantConfig":
        # a layer's own config keeps the selection, the scale init and the 8-bit activations (an "off" layer has none)
        a_bits = self.a_bits if w_bits != 16 else 16
        return QuantConfig(w_bits=w_bits, group_size=group_size, include=self.include, exclude=self.exclude,
                           scale_init=self.scale_init, a_bits=a_bits,
                           a_group_size=self.a_group_size if a_bits == 8 else None)

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` (a Linear) is to be quantized (an override "off" keeps
        a layer that the patterns select in full precision)."""
        if not (any(re.search(p, name) for p in self.include) and not any(re.search(p, name) for p in self.exclude)):
            return False
        return not self.overrides or self.for_layer(name).enabled

    def same_layers(self, other: "QuantConfig") -> bool:
        """Whether a model quantized by ``other`` has the layers and tensors this config makes: same
        bits, scale layout, selection, per-layer overrides and embedding/head/activation settings (how the
        scales were initialised does not matter)."""
        return (self.w_bits, self.group_size, self.include, self.exclude, self.overrides, *self.table_settings()) == \
            (other.w_bits, other.group_size, other.include, other.exclude, other.overrides, *other.table_settings())

    def describe(self) -> str:
        """"w_bits=2 group_size=None", plus the embedding/head/activation settings that are on and the number of
        per-layer overrides: what a refused resume names."""
        extra = "".join(f" {k}={getattr(self, k)}" for k, off in _TABLE_DEFAULTS.items() if getattr(self, k) != off)
        overrides = f" and {len(self.overrides)} per-layer override(s)" if self.overrides else ""
        return f"w_bits={self.w_bits} group_size={self.group_size}{extra}{overrides}"

    def summary(self) -> str:
        """One line for people: "3-bit, per row" or "mixed: 3-bit, per row default + 12 per-layer override(s)"."""
        from paretoq.quant.functional import group_label

        base = f"{self.w_bits:g}-bit, {group_label(self.group_size)}"
        return base if not self.overrides else f"mixed: {base} default + {len(self.overrides)} per-layer override(s)"

    def table_settings(self) -> tuple:
        """(embed_bits, embed_group_size, head_bits, head_group_size, a_bits, a_group_size): what a resumed run
        must share."""
        return (self.embed_bits, self.embed_group_size, self.head_bits, self.head_group_size, self.a_bits,
                self.a_group_size)

    def activation_block(self, name: str, in_features: int, table: bool = False) -> int | None:
        """The block (input features per max|x|) of the 8-bit activations of the layer ``name``: None = per
        token (or a_bits off). ``table``: the LM head of a quantized table (exported as Q4_0 or Q8_0, blocks of
        32 under "gguf")."""
        from paretoq.quant.functional import gguf_activation_block

        if self.a_bits != 8 or self.a_group_size is None:
            return None
        if self.a_group_size == "gguf":
            if table:
                return 32
            layer = self.for_layer(name)
            return gguf_activation_block(layer.w_bits, layer.group_size, in_features)
        if in_features % self.a_group_size:
            raise QuantConfigError(f"a_group_size {self.a_group_size} does not divide in_features {in_features} of "
                                   f"layer {name}: use a divisor (32 divides most), gguf, or omit it (per token)")
        return self.a_group_size

    @property
    def embed_scheme(self) -> Scheme | None:
        return TABLE_SCHEMES.get(self.embed_bits)

    @property
    def head_scheme(self) -> Scheme | None:
        return TABLE_SCHEMES.get(self.head_bits)

    def check_layer(self, name: str, in_features: int) -> None:
        self.activation_block(name, in_features)  # a_group_size must divide in_features too
        group_size = self.for_layer(name).group_size
        if group_size is not None and in_features % group_size:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f" (e.g. {', '.join(map(str, divisors))})" if divisors else ""
            raise QuantConfigError(
                f"group_size {group_size} does not divide in_features {in_features} of layer {name}: "
                f"choose a divisor of {in_features}{hint}, or omit group_size for per-row scales"
            )

    def to_dict(self, format: str = "fake") -> dict[str, Any]:
        """The ``config.json["quantization_config"]`` entry of a saved model folder."""
        d = {k: v for k, v in asdict(self).items() if k not in ("scheme", "overrides", *_TABLE_DEFAULTS)}
        d.update({k: getattr(self, k) for k, off in _TABLE_DEFAULTS.items() if getattr(self, k) != off})
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        if self.overrides:  # absent for a uniform config: its folders read as before
            d["overrides"] = [o.to_dict() for o in self.overrides]
        new = self.overrides or any(getattr(self, k) != off for k, off in _TABLE_DEFAULTS.items())
        return {"quant_method": QUANT_METHOD, **d, "format": format, "version": FORMAT_VERSION if new else _V1}

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
        kwargs = {k: d[k] for k in ("w_bits", "group_size", "include", "exclude", "scale_init", "overrides",
                                     *_TABLE_DEFAULTS) if k in d and d[k] is not None}
        if "group_size" in d:
            kwargs["group_size"] = d["group_size"]
        return cls(**kwargs)


_TABLE_DEFAULTS = {"embed_bits": 16, "embed_group_size": None, "head_bits": 16, "head_group_size": None, "a_bits": 16,
                   "a_group_size": None}
"""The embedding/head/activation fields and their "off" values: written to ``quantization_config``
only when set, so the entries of models without them are what they were before these fields."""



def _activation_group(value) -> int | str | None:
    """a_group_size: None / "none" / "token" = per token, a positive integer, or "gguf"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "token")):
        return None
    if isinstance(value, str) and value.strip().lower() == "gguf":
        return "gguf"
    try:
        n = int(value)
        if n != float(value) or n <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise QuantConfigError(f"a_group_size {value!r} is not supported: use a positive integer (32 = llama.cpp's "
                               "Q8_0 blocks, 256 = Q8_K), gguf (each layer as its GGUF type) or omit it (per "
                               "token)") from None
    return n


# --- QuantConfig files (YAML) ---------------------------------------------------------------------

QUANT_CONFIG_KEYS = ("w_bits", "group_size", "include", "exclude", "scale_init", "overrides", "embed_bits",
                     "embed_group_size", "head_bits", "head_group_size", "a_bits", "a_group_size")


def read_yaml_mapping(path: str | Path, flag: str, expected: str, error: type[Exception]) -> dict:
    """The mapping a YAML file holds (``paretoq train --config`` / ``--quant_config``); a missing file, bad YAML
    or another type raises ``error`` with one line naming ``flag`` and the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise error(f"{flag} {path}: no such file")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{flag} {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise error(f"{flag} {path}: expected {expected}, got {type(d).__name__}")
    return d


def load_quant_config(path: str | Path) -> QuantConfig:
    return read_quant_config(path)[0]


def read_quant_config(path: str | Path) -> tuple[QuantConfig, set[str]]:
    """(the QuantConfig, the keys the file sets). A QuantConfig from a YAML file (``paretoq allocate`` writes one; ``paretoq train
    --quant_config FILE`` reads it): keys w_bits, group_size, include, exclude, scale_init and
    overrides (a list of {pattern, w_bits, group_size}); a missing key takes QuantConfig's default."""

    d = read_yaml_mapping(path, "--quant_config", "a mapping (w_bits, group_size, overrides, ...)", QuantConfigError)
    unknown = sorted(set(d) - set(QUANT_CONFIG_KEYS))
    if unknown:
        raise QuantConfigError(f"--quant_config {path}: unknown key {unknown[0]!r} (expected {', '.join(QUANT_CONFIG_KEYS)})")
    try:
        return QuantConfig(**d), set(d)
    except (QuantConfigError, TypeError) as e:
        raise QuantConfigError(f"--quant_config {path}: {e}") from None


def quant_config_yaml(config: QuantConfig, header: str = "") -> str:
    """The YAML text of ``config`` that ``load_quant_config`` reads back (``header``: comment lines)."""
    import yaml

    d = {k: v for k, v in config.to_dict().items() if k in QUANT_CONFIG_KEYS}
    d.setdefault("overrides", [])
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=200)
