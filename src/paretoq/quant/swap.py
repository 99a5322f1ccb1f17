"""Model surgery: swap ``nn.Linear`` modules for ``QuantLinear`` (and back), in place."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from paretoq.quant import scale_init as scale_init_lib
from paretoq.quant.config import QuantConfig, QuantConfigError
from paretoq.quant.embedding import QuantEmbedding, QuantHead, QuantTiedHead
from paretoq.quant.functional import group_label
from paretoq.quant.fused import set_kernels
from paretoq.quant.linear import QuantLinear

logger = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What ``quantize_model`` did."""

    w_bits: float
    group_size: int | None
    layers: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # quantized embedding / LM head (embed_bits, head_bits)
    quantized_params: int = 0
    total_params: int = 0
    mixed: str | None = None  # QuantConfig.summary() of a config with per-layer overrides

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fraction_quantized(self) -> float:
        return self.quantized_params / max(self.total_params, 1)

    def __str__(self) -> str:
        what = self.mixed or f"{self.w_bits} bits ({group_label(self.group_size)})"
        tables = f" and {', '.join(self.tables)}" if self.tables else ""
        return (f"quantized {self.num_layers} Linear layers to {what}{tables}: "
                f"{self.quantized_params:,} of {self.total_params:,} parameters ({self.fraction_quantized:.1%})")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (e.g. ``model.layers.0.mlp.up_proj``) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def selected_linears(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` modules ``config`` selects, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and config.selects(n)]


def quantize_model(model: nn.Module, config: QuantConfig, init_scales: bool = True,
                   calibration_data=None, kernels="eager") -> QuantReport:
    """Swap the selected Linear layers of ``model`` for ``QuantLinear``, in place.

    Every layer is checked before any is swapped, so a bad ``group_size`` leaves the model as it
    was. Scales are initialised from the weights (``init_scales=True``, by ``config.scale_init``)
    or left for a checkpoint to fill. ``calibration_data`` (token ids, (num_blocks, block_len)) is
    needed by ``scale_init="mse_act"`` / ``"gptq"``: the full-precision model runs on it once,
    before the swap, to measure E[x²] (E[x xᵀ] for gptq) of each selected layer's input. The model's ``config.quantization_config``
    records the setting so that ``save_pretrained`` / ``from_pretrained`` (after ``import
    paretoq``) round-trip it.

    ``kernels`` chooses the quantizer the new layers run (``paretoq.quant.set_kernels`` switches
    them, or a model quantized earlier, later): "eager" (default: nothing is compiled), "fused" (fused
    kernels: on CPU built ahead of time in child processes at their first call, once per machine,
    and cached on disk; hand-written Triton kernels on CUDA; ``torch.compile`` on other devices) or
    "auto" (fused for CPU and CUDA weights, eager elsewhere — what ``paretoq train`` uses,
    ``--compile_quantizer auto``). Same Ŵ and ∂L/∂W bits
    either way, ∂L/∂α to summation order.
    """
    report = QuantReport(w_bits=config.w_bits, group_size=config.group_size,
                         total_params=sum(p.numel() for p in model.parameters()),
                         mixed=config.summary() if config.mixed else None)
    if not config.enabled:
        return report
    set_kernels([], kernels)  # a bad choice fails before the model changes
    targets = selected_linears(model, config)
    for name, linear in targets:
        config.check_layer(name, linear.in_features)
    table_modules(model, config)  # embed_bits / head_bits checked before anything changes
    stats = None
    if init_scales and scale_init_lib.needs_calibration(config.scale_init) and targets:
        if calibration_data is None:
            raise QuantConfigError(
                f"scale_init {config.scale_init!r} needs calibration data: pass calibration_data=<token ids "
                "(blocks, length)> to quantize_model (paretoq train: --calibration_samples N), or use scale_init "
                "'mse' / 'reference'")
        stats = scale_init_lib.calibration_statistics(model, dict(targets), config.scale_init, calibration_data)
    swapped = {}
    for name, linear in targets:
        swapped[name] = QuantLinear.from_linear(linear, config.for_layer(name), name=name, init=init_scales)
        set_module(model, name, swapped[name])
        report.layers.append(name)
        report.quantized_params += linear.weight.numel()
    if init_scales:
        scale_init_lib.initialize_scales(swapped, config.scale_init, stats)
    for name in quantize_tables(model, config, init=init_scales):
        report.tables.append(name)
        report.quantized_params += model.get_submodule(name).weight.numel()
    if not targets:
        logger.warning("quantize_model: no Linear layer matched include=%s exclude=%s", config.include, config.exclude)
    set_kernels(swapped.values(), kernels)
    if hasattr(model, "config"):
        model.config.quantization_config = config.to_dict()
    # INFO for a real quantization; DEBUG when the layers are only rebuilt for loading a checkpoint
    logger.log(logging.INFO if init_scales else logging.DEBUG, "%s", report)
    return report


def dequantize_model(model: nn.Module) -> nn.Module:
    """Bake the fake-quantized weights into plain ``nn.Linear`` (``nn.Embedding``) layers, in place; returns ``model``."""
    baked = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            set_module(model, name, module.to_linear())
        elif isinstance(module, QuantEmbedding):
            baked[module] = module.to_embedding()
            set_module(model, name, baked[module])
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantTiedHead):
            set_module(model, name, module.to_linear(baked[module.source]))
    if hasattr(model, "config") and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def table_modules(model: nn.Module, config: QuantConfig) -> tuple[str | None, str | None, bool]:
    """(embedding name, LM head name, tied) of the tables ``embed_bits`` / ``head_bits`` quantize (None
    where not quantized). A tied model has one matrix: ``embed_bits`` quantizes it (the head then
    reads it); ``head_bits`` alone, or a ``head_bits`` layout other than ``embed_bits``', is refused.
    Every problem raises ``QuantConfigError`` before the model is changed."""
    if config.embed_bits == 16 and config.head_bits == 16:
        return None, None, False
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    names = {id(m): n for n, m in model.named_modules()}
    if config.embed_bits != 16 and (emb is None or id(emb) not in names):
        raise QuantConfigError("embed_bits: this model has no input embedding (get_input_embeddings())")
    if config.head_bits != 16 and (head is None or id(head) not in names):
        raise QuantConfigError("head_bits: this model has no LM head (get_output_embeddings())")
    head_weight = getattr(head, "weight", None)
    tied = head is not None and emb is not None and (
        isinstance(head, QuantTiedHead) or (head_weight is not None and head_weight is getattr(emb, "weight", None))
        or bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)))
    if tied:
        if config.embed_bits == 16:
            raise QuantConfigError("this model ties its LM head to the input embedding (one matrix): quantize it "
                                   "with embed_bits (--embed_bits, --embed_group_size) instead of head_bits")
        if config.head_bits != 16 and (config.head_bits, config.head_group_size) != \
                (config.embed_bits, config.embed_group_size):
            raise QuantConfigError(
                f"this model ties its LM head to the input embedding (one matrix, quantized once): head_bits "
                f"{config.head_bits} / head_group_size {config.head_group_size} differ from embed_bits "
                f"{config.embed_bits} / embed_group_size {config.embed_group_size}; give embed_bits only")
    emb_name = names[id(emb)] if config.embed_bits != 16 else None
    head_name = names[id(head)] if (config.head_bits != 16 or (tied and emb_name)) else None
    from paretoq.quant.embedding import check_table

    if emb_name is not None:
        check_table("embed", emb_name, emb.embedding_dim, config.embed_group_size)
    if head_name is not None and not tied:
        check_table("head", head_name, head.in_features, config.head_group_size)
    return emb_name, head_name, tied


def quantize_tables(model: nn.Module, config: QuantConfig, init: bool = True) -> list[str]:
    """Swap the embedding / LM head that ``embed_bits`` / ``head_bits`` select for ``QuantEmbedding``,
    ``QuantHead`` or (tied) ``QuantTiedHead``, in place; returns the names of the quantized tables."""
    emb_name, head_name, tied = table_modules(model, config)
    names = []
    if emb_name is not None:
        emb = model.get_submodule(emb_name)
        q = emb if isinstance(emb, QuantEmbedding) else QuantEmbedding.from_embedding(emb, config, emb_name, init)
        set_module(model, emb_name, q)
        names.append(emb_name)
        if tied:
            set_module(model, head_name, QuantTiedHead(q))
    if head_name is not None and not tied:
        head = model.get_submodule(head_name)
        if not isinstance(head, QuantHead):
            set_module(model, head_name, QuantHead.from_head(head, config, head_name, init))
        names.append(head_name)
    return names
