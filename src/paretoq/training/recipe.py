"""QAT recipe controls: a full-precision phase before QAT, LR re-warm-up, WSD, distillation.

``RecipeTrainer`` = ``QATTrainer`` + ``DistillationMixin`` (``distill.py``) + what follows.

**Two phases** (``--qat_start_fraction f``): the first s = round(f·max_steps) optimizer steps
train the model in full precision; before step s+1, ``QATStartCallback`` calls
``quantize_model`` on the live model, in place. The new ``QuantLinear`` modules reuse the same
weight Parameters (their AdamW state carries on), their scales are initialised from the
*then-current* weights (``--scale_init``, with the calibration blocks for ``mse_act``/``gptq``), and the
scales join the optimizer's scale group — which exists, empty, from step 0 so that the LR
scheduler knows its base LR (LR × ``scale_lr_multiplier``). f = 0 (default) quantizes before
training starts, as always.

**Schedule with re-warm-up**: the LR schedule (``--lr_scheduler_type``: cosine by default, any
transformers schedule, e.g. ``warmup_stable_decay``) restarts when QAT starts: phase 1 (FP) runs
its own warm-up + decay over s steps, phase 2 (QAT) a fresh warm-up (``--warmup_steps``: a count,
or a fraction of the phase when < 1) + decay over the remaining steps. That re-warm-up is what
BitCPM4 calls critical: the freshly quantized network first sees small steps while Adam's moments
and the new scales settle. Without an FP phase this is exactly transformers' schedule.
``warmup_stable_decay`` needs ``num_decay_steps``: give it with ``--lr_scheduler_kwargs
'{"num_decay_steps": N}'`` (per phase), or leave it out for 20% of each phase.

**Resume**: checkpoints written before the switch are full-precision (no ``weight_clip_val``, no
``quantization_config``); ``run_training`` resumes them as FP models and the switch happens at
the same step as in an uninterrupted run; checkpoints after the switch are resumed as quantized
models (scales from the checkpoint). The scale initialisation at the switch depends only on the
weights at that step (and the calibration blocks, taken by seed), so a resumed run takes the same
path. Multi-process runs (DDP/FSDP/DeepSpeed) are refused with an FP phase: they wrap the module
tree before the switch could change it.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback
from transformers.optimization import get_scheduler

from paretoq.errors import UserError
from paretoq.quant.config import QuantConfig
from paretoq.quant.fused import set_kernels
from paretoq.quant.init import needs_calibration
from paretoq.quant.linear import QuantLinear, set_fake_quant_cache
from paretoq.quant.swap import quantize_model
from paretoq.training.distill import DistillationMixin
from paretoq.training.trainer import SCALE_PARAM, QATTrainer

logger = logging.getLogger(__name__)

WSD_DEFAULT_DECAY_FRACTION = 0.2


def qat_start_step(fraction: float, max_steps: int) -> int:
    """The optimizer step after which QAT starts: round(fraction · max_steps), 0 = from the start."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"qat_start_fraction must be in [0, 1), got {fraction}")
    return int(round(fraction * max_steps))


def is_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def _is_wsd(name) -> bool:
    return getattr(name, "value", name) == "warmup_stable_decay"


def _phase_lambda(args, name, steps: int):
    """transformers' multiplier λ(k) of schedule ``name`` over ``steps`` steps (warm-up included)."""
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if _is_wsd(name) and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = int(round(WSD_DEFAULT_DECAY_FRACTION * steps))
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, optimizer=dummy, num_warmup_steps=args.get_warmup_steps(steps),
                          num_training_steps=steps, scheduler_specific_kwargs=kwargs)
    return sched.lr_lambdas[0]


def two_phase_lambda(args, total_steps: int, switch_step: int):
    """λ(k): the schedule over [0, s) and, restarted with a fresh warm-up, over [s, total)."""
    qat = _phase_lambda(args, args.lr_scheduler_type, max(total_steps - switch_step, 1))
    if switch_step <= 0:
        return qat
    fp = _phase_lambda(args, args.lr_scheduler_type, switch_step)

    def lr_lambda(step: int) -> float:
        return fp(step) if step < switch_step else qat(step - switch_step)

    return lr_lambda


def _scale_group(optimizer) -> dict | None:
    for group in optimizer.param_groups:
        if group.get("paretoq_scales"):
            return group
    return None


class QATStartCallback(TrainerCallback):
    """Quantizes the model in place when ``state.global_step`` reaches the QAT start step."""

    def __init__(self, quant_config: QuantConfig, fraction: float, calibration_data=None, after_switch=None):
        self.quant_config = quant_config
        self.fraction = fraction
        self.calibration_data = calibration_data
        self.after_switch = after_switch
        self.switch_step: int | None = None
        self.switched_at: int | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.switch_step = qat_start_step(self.fraction, state.max_steps)
        if is_quantized(model):
            if state.global_step < self.switch_step:
                raise UserError(f"the checkpoint is quantized at step {state.global_step}, before this run's QAT start "
                                f"(step {self.switch_step}): resume with the --qat_start_fraction / --max_steps it was "
                                "written with, or use another --output_dir")
            self.switched_at = self.switch_step  # resumed after the switch
        elif state.global_step > self.switch_step:
            raise UserError(f"the checkpoint is full precision at step {state.global_step}, after this run's QAT start "
                            f"(step {self.switch_step}): resume with the --qat_start_fraction / --max_steps it was "
                            "written with, or use another --output_dir")

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.switched_at is None and state.global_step >= self.switch_step:
            self.switch(model, optimizer, state.global_step)

    def switch(self, model, optimizer, step: int) -> None:
        report = quantize_model(model, self.quant_config, calibration_data=self.calibration_data)
        group = _scale_group(optimizer)
        if group is None:
            raise RuntimeError("the optimizer has no scale parameter group to add the new scales to")
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        group["params"].extend(p for n, p in model.named_parameters()
                               if n.endswith(SCALE_PARAM) and p.requires_grad and id(p) not in known)
        self.switched_at = step
        if self.after_switch is not None:
            self.after_switch(model)
        logger.info("step %d: QAT starts — %s", step, report)


class RecipeTrainer(DistillationMixin, QATTrainer):
    """``QATTrainer`` with distillation, an optional full-precision phase and a re-warm-up schedule."""

    def __init__(self, *args, quant_config: QuantConfig | None = None, qat_start_fraction: float = 0.0,
                 calibration_data=None, **kwargs):
        self.qat_start_fraction = qat_start_fraction
        super().__init__(*args, **kwargs)
        self.qat_start = None
        if qat_start_fraction > 0:
            if quant_config is None or not quant_config.enabled:
                raise ValueError("qat_start_fraction > 0 needs a quantizing quant_config")
            if self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("qat_start_fraction > 0 works in single-process runs only (DDP/FSDP/DeepSpeed wrap "
                                 "the model before QAT would start): use qat_start_fraction 0")
            self.qat_start = QATStartCallback(quant_config, qat_start_fraction, calibration_data,
                                              after_switch=self._after_switch)
            self.add_callback(self.qat_start)

    def _after_switch(self, model) -> None:
        """The freshly quantized layers get the run's fake-quant cache setting and quantizer kernels."""
        set_fake_quant_cache(model, self.fake_quant_cache)
        if self.quantizer_kernels is not None:
            set_kernels(model, self.quantizer_kernels)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        scales = {id(p) for n, p in (model or self.model).named_parameters() if n.endswith(SCALE_PARAM)}
        for group in optimizer.param_groups:
            if group["params"] and all(id(p) in scales for p in group["params"]):
                group["paretoq_scales"] = True
        if self.qat_start is not None and _scale_group(optimizer) is None:
            lr = self.args.learning_rate * self.scale_lr_multiplier
            optimizer.add_param_group({"params": [], "weight_decay": 0.0, "lr": lr, "paretoq_scales": True})
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        switch = qat_start_step(self.qat_start_fraction, num_training_steps)
        kwargs = self.args.lr_scheduler_kwargs or {}
        wsd_default = _is_wsd(self.args.lr_scheduler_type) and "num_decay_steps" not in kwargs
        if switch == 0 and not wsd_default:
            return super().create_scheduler(num_training_steps, optimizer)  # transformers' schedule, untouched
        try:
            lr_lambda = two_phase_lambda(self.args, num_training_steps, switch)
        except AttributeError:  # a scheduler that is not a LambdaLR (e.g. reduce_lr_on_plateau)
            raise ValueError(f"lr_scheduler_type {self.args.lr_scheduler_type} cannot restart at the QAT start: use "
                             "cosine, linear, constant_with_warmup, warmup_stable_decay, ...") from None
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler



# --- the CLI side: validation and the pieces run_training needs ---------------------------------

DEFAULT_CALIBRATION_SAMPLES = 16


def validate_recipe_args(cfg) -> None:
    """Check the recipe flags of a ``TrainConfig`` (UserError naming the flag); fill defaults."""
    from paretoq.training.distill import TEACHER_DTYPES

    m = cfg.model
    if m.calibration_samples is not None and m.calibration_samples < 1:
        raise UserError(f"--calibration_samples must be at least 1, got {m.calibration_samples}")
    if needs_calibration(m.scale_init) and m.calibration_samples is None:
        m.calibration_samples = DEFAULT_CALIBRATION_SAMPLES
    if m.scale_learning_rate is not None and m.scale_learning_rate <= 0:
        raise UserError(f"--scale_learning_rate must be positive, got {m.scale_learning_rate}")
    if not 0.0 <= m.qat_start_fraction < 1.0:
        raise UserError(f"--qat_start_fraction must be in [0, 1), got {m.qat_start_fraction}")
    if m.qat_start_fraction > 0 and not cfg.quant.enabled:
        raise UserError("--qat_start_fraction needs a quantizing --w_bits (1, 1.58, 2, 3 or 4)")
    if m.qat_start_fraction > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--qat_start_fraction works in single-process runs only: drop it, or run on one process")
    if not 0.0 <= m.kd_weight <= 1.0:
        raise UserError(f"--kd_weight must be in [0, 1], got {m.kd_weight}")
    if m.kd_temperature <= 0:
        raise UserError(f"--kd_temperature must be positive, got {m.kd_temperature}")
    if m.kd_teacher_dtype not in TEACHER_DTYPES:
        raise UserError(f"--kd_teacher_dtype {m.kd_teacher_dtype!r}: use fp32 or bf16")


def scale_lr_multiplier(cfg) -> float:
    """LR of the scales relative to --learning_rate: --scale_learning_rate / LR if given, else the multiplier."""
    if cfg.model.scale_learning_rate is not None:
        return cfg.model.scale_learning_rate / cfg.training.learning_rate
    return cfg.model.scale_lr_multiplier


def calibration_blocks(train_blocks: torch.Tensor, samples: int | None, seed: int) -> torch.Tensor | None:
    """``samples`` training blocks drawn without replacement by ``seed`` (all of them if fewer)."""
    if not samples:
        return None
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_blocks), generator=g)[:samples]
    return train_blocks[order.sort().values]


def checkpoint_is_quantized(checkpoint: str | None) -> bool:
    """Whether a checkpoint folder's config.json records a quantization_config (False before the switch)."""
    import json
    from pathlib import Path

    if not checkpoint:
        return False
    try:
        return bool(json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config"))
    except (OSError, ValueError):
        return False


def prepare_model(model, cfg, train_blocks: torch.Tensor, resume: str | None):
    """Before the Trainer exists: the teacher copy (KD), the calibration blocks, and the swap — now,
    or (``--qat_start_fraction`` > 0, not resuming past the switch) later, by ``QATStartCallback``.

    Returns ``(report, teacher, calibration)``; ``report`` is None while the model stays FP.
    """
    from paretoq.training.distill import make_teacher
    from paretoq.training.sharding import full_weights, zero3_enabled

    m = cfg.model
    if zero3_enabled() and m.kd_weight > 0:
        raise UserError("--kd_weight needs a whole FP teacher copy on every rank, which DeepSpeed ZeRO-3 cannot "
                        "shard: use configs/deepspeed_zero2.json (or DDP) for distillation")
    teacher = make_teacher(model, m.kd_teacher_dtype) if m.kd_weight > 0 else None
    calibration = calibration_blocks(train_blocks, m.calibration_samples, cfg.training.seed) \
        if needs_calibration(cfg.quant.scale_init) else None
    report = None
    if m.qat_start_fraction == 0 or checkpoint_is_quantized(resume):
        with full_weights(model):  # ZeRO-3 has partitioned the loaded weights (training/sharding.py)
            report = quantize_model(model, cfg.quant, calibration_data=calibration)  # logs the report
    else:
        logger.info("full-precision phase first: QAT starts after %.0f%% of the steps", 100 * m.qat_start_fraction)
    return report, teacher, calibration


def recipe_trainer_kwargs(cfg, teacher, calibration) -> dict:
    """The ``RecipeTrainer`` keyword arguments of a ``TrainConfig``."""
    m = cfg.model
    return {"scale_lr_multiplier": scale_lr_multiplier(cfg), "quant_config": cfg.quant,
            "qat_start_fraction": m.qat_start_fraction, "calibration_data": calibration,
            "teacher": teacher, "kd_weight": m.kd_weight, "kd_temperature": m.kd_temperature}
