"""Arguments of ``paretoq train``: our dataclasses + every transformers ``TrainingArguments`` flag.

The seed's flag names (``--input_model_filename``, ``--output_model_filename``, ``--local_dir``,
``--train_data_local_path``, ``--eval_data_local_path``, ``--w_bits``, ``--model_max_length``,
``--cache_dir``, ``--contain_weight_clip_val``, ``--logging_dir``) are accepted as they are.
One source of truth: dataclass defaults, then ``--config run.yaml``, then the command line.
The resolved values are written to ``output_dir/paretoq_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from paretoq.errors import UserError
from paretoq.files import atomic_write
from paretoq.quant.config import QuantConfig


@dataclass
class ModelArguments:
    input_model_filename: str | None = field(default=None, metadata={"help": "model folder (HF layout) to start QAT from"})
    output_model_filename: str | None = field(
        default=None, metadata={"help": "name of the final model folder under <local_dir>/models/ (seed layout); "
                                        "default: the final model is written to output_dir"})
    local_dir: str | None = field(default=None, metadata={"help": "base folder for output_model_filename (seed)"})
    w_bits: str | None = field(default=None, metadata={"help": "required: 1, 1.58, 2, 3, 4; 16 = no quantization, "
                                                                  "on purpose (0 = 1.58)"})
    group_size: int | None = field(default=None, metadata={"help": "input columns per scale; default one per row"})
    quant_config: str | None = field(default=None, metadata={
        "help": "QuantConfig YAML (e.g. from paretoq allocate): w_bits, group_size, per-layer overrides, include, "
                "exclude, scale_init. It replaces --w_bits/--group_size (and --scale_init when it has that key); "
                "giving one of those flags with another value than the file's is refused"})
    contain_weight_clip_val: bool | None = field(
        default=None, metadata={"help": "accepted for seed compatibility: scales are always kept when the "
                                        "checkpoint has them, and initialised from the weights otherwise"})
    qat: bool | None = field(default=None, metadata={"help": "accepted for ParetoQ/seed compatibility: QAT is on "
                                                              "whenever w_bits < 16"})
    scale_lr_multiplier: float = field(default=1.0, metadata={"help": "LR of the scales = learning_rate × this"})
    # -- embedding table, LM head, activations (docs/formats.md "Quantized embeddings and LM head") --
    embed_bits: str | None = field(default=None, metadata={
        "help": "quantize the input embedding too: 1, 1.58, 2, 3, 4 or 8 (default 16 = off); on a tied model "
                "(MiniCPM4, SmolLM2) the one shared matrix, used by the LM head as well"})
    embed_group_size: int | None = field(default=None, metadata={
        "help": "embedding columns per scale (e.g. 32: exact GGUF Q4_0 / Q8_0); default one scale per token row"})
    head_bits: str | None = field(default=None, metadata={
        "help": "quantize an untied LM head: 1, 1.58, 2, 3, 4 or 8 (default 16 = off; tied models: --embed_bits)"})
    head_group_size: int | None = field(default=None, metadata={"help": "LM head input columns per scale"})
    a_bits: int | None = field(default=None, metadata={
        "help": "8 = fake-quantize each quantized layer's input to 8 bits (absmax, straight-through), as llama.cpp "
                "and BitNet b1.58 run it; default 16 = off"})
    a_group_size: str | None = field(default=None, metadata={
        "help": "with --a_bits 8: where max|x| is taken: per token (default, BitNet b1.58), N input features "
                "(32 = llama.cpp's Q8_0 blocks, 256 = Q8_K), or gguf = per layer as llama.cpp runs the GGUF type "
                "paretoq exports it as (the way to match llama.cpp)"})
    # -- quality recipe (docs/quality.md) --
    scale_init: str = field(default="reference", metadata={
        "help": "scale init: reference (ParetoQ closed form) | mse (per row/group search minimising ||W-Q(W)||^2) | "
                "mse_act (the same, input columns weighted by E[x^2] on --calibration_samples training blocks) | "
                "gptq (mse_act scales + GPTQ error feedback on the latent weights; more calibration memory)"})
    calibration_samples: int | None = field(default=None, metadata={
        "help": "training blocks used as calibration data for --scale_init mse_act / gptq (default 16 then)"})
    scale_learning_rate: float | None = field(default=None, metadata={
        "help": "absolute LR of the scales (overrides --scale_lr_multiplier)"})
    qat_start_fraction: float = field(default=0.0, metadata={
        "help": "first fraction of the steps trains in full precision, then the model is quantized in place and "
                "the LR schedule restarts with a fresh warm-up (0 = QAT from the start)"})
    kd_weight: float = field(default=0.0, metadata={
        "help": "knowledge distillation from the FP model: loss = (1-w)*CE + w*T^2*KL(teacher||student)"})
    kd_temperature: float = field(default=1.0, metadata={"help": "distillation temperature T"})
    kd_teacher_dtype: str = field(default="fp32", metadata={"help": "teacher weights: fp32 | bf16 (half the memory)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow code from the model folder (off)"})


@dataclass
class DataArguments:
    train_data_local_path: str | None = field(default=None, metadata={"help": "JSONL with one {\"text\": ...} per line"})
    eval_data_local_path: str | None = field(default=None, metadata={"help": "eval JSONL; default: held out of train"})
    model_max_length: int = field(default=2048, metadata={"help": "tokens per training block"})
    cache_dir: str | None = field(default=None, metadata={"help": "tokenised-data cache (default output_dir/.cache)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of blocks held out when no eval file"})


@dataclass
class RunArguments:
    config: str | None = field(default=None, metadata={"help": "YAML file of flag values (CLI flags override)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir "
                                                          "(re-running the same command does so too)"})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard folder (default output_dir/logs)"})
    compile_quantizer: str = field(default="auto", metadata={
        "help": "fused quantizer kernels: auto (on when training on CPU or a CUDA GPU; default from "
                "$PARETOQ_COMPILE_QUANTIZER) | true | false. Same Ŵ and ∂W bits as the eager quantizer, "
                "faster steps; on CPU built by Inductor once per machine into ~/.cache/paretoq/kernels "
                "($PARETOQ_KERNEL_CACHE), on GPU hand-written Triton kernels; paretoq/quant/fused.py)"})
    master_weights: str = field(default="fp32", metadata={
        "help": "fp32 (default): fp32 weights, gradients and AdamW states (16 bytes/parameter) | bf16 (lean): bf16 "
                "weights and gradients, fp32 scales, torchao's 8-bit AdamW (--optim adamw_torch_8bit, the default "
                "then; or adamw_torch_4bit) with stochastic rounding of the bf16 updates (~6 bytes/parameter)"})
    loss_chunk_size: str = field(default="auto", metadata={
        "help": "positions per chunk of the training loss, so that the whole sequence's logits never exist at "
                "once: auto (1024 when a micro-batch's fp32 logits would take over 256 MiB) | N | 0 (plain loss)"})


DATACLASSES = (ModelArguments, DataArguments, RunArguments, TrainingArguments)
# what a run cannot do without: the model, the data, the bit width (16 = no quantization, on purpose), the folder
REQUIRED = ("input_model_filename", "train_data_local_path", "w_bits", "output_dir")
COMPILE_QUANTIZER_ENV = "PARETOQ_COMPILE_QUANTIZER"
_SWITCH_VALUES = {"auto": "auto", "true": "true", "yes": "true", "1": "true", "false": "false", "no": "false", "0": "false"}

# Defaults that differ from transformers' (a QAT user expects logs and metrics out of the box).
_HAS_GPU = torch.cuda.is_available()
OUR_TRAINING_DEFAULTS = {"dataloader_pin_memory": _HAS_GPU, "use_cpu": not _HAS_GPU, "report_to": ["tensorboard"], "logging_steps": 10, "save_total_limit": 3,
                         "weight_decay": 0.0, "lr_scheduler_type": "cosine", "learning_rate": 2e-5}


@dataclass
class TrainConfig:
    """One run's settings. ``quant`` is built once from the model arguments (and validates them);
    derive another run's config with ``dataclasses.replace``, which builds it again."""

    model: ModelArguments
    data: DataArguments
    run: RunArguments
    training: TrainingArguments
    quant: QuantConfig = field(init=False)

    def __post_init__(self):
        m = self.model
        tables = dict(embed_bits=16 if m.embed_bits is None else m.embed_bits, embed_group_size=m.embed_group_size,
                      head_bits=16 if m.head_bits is None else m.head_bits, head_group_size=m.head_group_size,
                      a_bits=16 if m.a_bits is None else m.a_bits, a_group_size=m.a_group_size)
        if m.quant_config:
            from paretoq.quant.config import read_quant_config

            file_config, keys = read_quant_config(m.quant_config)
            init = file_config.scale_init if "scale_init" in keys else m.scale_init
            given = {k: v for k, v in tables.items() if getattr(m, k) is not None}  # flags on top of the file
            self.quant = dataclasses.replace(file_config, scale_init=init, **given)
        else:
            self.quant = QuantConfig(w_bits=m.w_bits, group_size=m.group_size, scale_init=m.scale_init, **tables)

    def seed_flag_notes(self) -> list[str]:
        """One line per seed flag given that has no effect here, saying what paretoq does instead."""
        notes = []
        if self.model.qat is not None:
            notes.append(f"--qat {self.model.qat} has no effect: QAT is on whenever --w_bits is below 16 "
                         f"(here w_bits={self.quant.w_bits})")
        if self.model.contain_weight_clip_val is not None:
            notes.append(f"--contain_weight_clip_val {self.model.contain_weight_clip_val} has no effect: scales are "
                         "loaded when the checkpoint has them and initialised from the weights otherwise")
        return notes

    @property
    def fused_quantizer(self) -> bool:
        """Whether ``--compile_quantizer`` (validated: auto | true | false) turns the fused kernels on.

        auto = on where they are verified bit for bit against the eager quantizer: CPU training (the
        kernels built ahead of time) and CUDA GPUs (the hand-written Triton kernels of
        ``paretoq.quant.triton_kernels``, correctly rounded division: tests/quant/test_triton_kernels.py
        in Triton's interpreter, tests/test_cuda.py on a GPU)."""
        return self.run.compile_quantizer == "true" or (
            self.run.compile_quantizer == "auto" and (self.training.use_cpu or torch.cuda.is_available()))

    @property
    def loss_chunk_size(self) -> int | None:
        """``QATTrainer``'s loss_chunk_size: None for auto, else the validated number (0 = plain loss)."""
        return None if self.run.loss_chunk_size == "auto" else int(self.run.loss_chunk_size)

    @property
    def final_model_dir(self) -> str:
        if self.model.output_model_filename:
            return os.path.join(self.model.local_dir or self.training.output_dir, "models", self.model.output_model_filename)
        return self.training.output_dir

    def to_dict(self) -> dict:
        out = {}
        for part in (self.model, self.data, self.run):
            out.update(dataclasses.asdict(part))
        training = self.training.to_dict()
        out.update({k: v for k, v in training.items() if not k.startswith("_") and "token" not in k})
        return out

    def save(self, folder: str) -> str:
        path = Path(folder) / "paretoq_config.yaml"
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=False))
        return str(path)


class _Parser(HfArgumentParser):
    """HfArgumentParser whose usage errors raise UserError (one line, exit 2) instead of exiting."""

    def error(self, message):
        raise UserError(message)


def make_parser() -> HfArgumentParser:
    parser = _Parser(DATACLASSES, prog="paretoq train")
    parser.set_defaults(**{k: v for k, v in OUR_TRAINING_DEFAULTS.items()})
    return parser


def _read_yaml(path: str) -> dict:
    from paretoq.quant.config import read_yaml_mapping

    return read_yaml_mapping(path, "--config", "a mapping of flag: value", UserError)


def parse_train_args(argv: list[str] | None = None, defaults: dict | None = None) -> TrainConfig:
    """Parse ``paretoq train`` flags: dataclass defaults < ``defaults`` < YAML ``--config`` < argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    known = {a.dest for a in parser._actions}
    layered = dict(defaults or {})
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        pre, _ = _Parser(RunArguments, add_help=False).parse_known_args(argv)
        if pre.config:
            layered.update(_read_yaml(pre.config))
    unknown = sorted(set(layered) - known)
    if unknown:
        raise UserError(f"unknown option(s) in config: {', '.join(unknown)} (see paretoq train --help)")
    env_default = os.environ.get(COMPILE_QUANTIZER_ENV)
    if env_default:
        parser.set_defaults(compile_quantizer=env_default)
    parser.set_defaults(**layered)
    def given(name):
        return layered.get(name) not in (None, "") or any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)

    quant_file = given("quant_config")
    missing = [f"--{name}" for name in REQUIRED if not given(name) and not (name == "w_bits" and quant_file)]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (paretoq train --help lists every flag; `paretoq demo` "
                        "runs a complete example on a built-in model and data)")
    try:
        model, data, run, training, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # TrainingArguments' own validation (e.g. incompatible flags)
        raise UserError(" ".join(str(e).split())) from None
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)} (see paretoq train --help)")
    _validate(model, data, run)
    from paretoq.training.lean import validate_master_weights

    explicit_optim = "optim" in layered or any(a == "--optim" or a.startswith("--optim=") for a in argv)
    training.optim = OptimizerNames(validate_master_weights(
        run.master_weights, getattr(training.optim, "value", training.optim), training.optim_args, explicit_optim))
    if model.quant_config:
        _check_quant_config_flags(model, given)
    cfg = TrainConfig(model, data, run, training)  # builds and validates the QuantConfig (a UserError)
    from paretoq.training.recipe import validate_recipe_args

    validate_recipe_args(cfg)
    return cfg


def _check_quant_config_flags(model: ModelArguments, given) -> None:
    """--quant_config FILE decides the bits, scale layouts and (when it has the key) the scale init;
    --w_bits / --group_size / --scale_init given too (command line or --config) must agree with it."""
    from paretoq.quant.config import parse_bits, read_quant_config

    file_config, keys = read_quant_config(model.quant_config)
    checks = [("w_bits", model.w_bits, file_config.w_bits, lambda v: parse_bits(v)),
              ("group_size", model.group_size, file_config.group_size, lambda v: v),
              ("scale_init", model.scale_init, file_config.scale_init if "scale_init" in keys else None, lambda v: v)]
    for flag, value, in_file, norm in checks:
        if given(flag) and (in_file is not None or flag == "group_size") and norm(value) != in_file:
            raise UserError(f"--{flag} {value} conflicts with --quant_config {model.quant_config} ({flag}: {in_file}): "
                            f"give the setting in one place (the file wins when the flag is left out)")


def _validate(model: ModelArguments, data: DataArguments, run: RunArguments) -> None:
    if data.model_max_length <= 0:
        raise UserError(f"--model_max_length must be a positive number of tokens, got {data.model_max_length}")
    switch = _SWITCH_VALUES.get(str(run.compile_quantizer).strip().lower())
    if switch is None:
        raise UserError(f"--compile_quantizer must be auto, true or false, got {run.compile_quantizer!r}"
                        f" (the default comes from ${COMPILE_QUANTIZER_ENV} when set)")
    run.compile_quantizer = switch
    chunk = str(run.loss_chunk_size).strip().lower()
    if chunk != "auto" and not (chunk.isdigit()):
        raise UserError(f"--loss_chunk_size must be auto, 0 or a positive number of positions, got {run.loss_chunk_size!r}")
    run.loss_chunk_size = chunk
    if model.scale_lr_multiplier <= 0:
        raise UserError(f"--scale_lr_multiplier must be positive, got {model.scale_lr_multiplier}")
