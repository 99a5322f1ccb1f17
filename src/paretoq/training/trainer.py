"""`QATTrainer`: transformers' Trainer plus what QAT needs, and the callbacks of a paretoq run.

- The optimizer puts the scales (``weight_clip_val``) in their own parameter group: no weight
  decay, learning rate × ``scale_lr_multiplier`` (the scheduler scales every group alike).
- The fake-quant cache (``paretoq.quant.linear``) is on in single-process runs with gradient
  accumulation or checkpointing: Ŵ once per optimizer step, its summed gradient pushed through the
  quantizer after the step's last micro-batch.
- ``quantizer_kernels`` ("eager", "fused", "auto" or a ``FusedKernels``; ``paretoq.quant.fused``)
  chooses the quantizer of the model's layers and of those a mid-run QAT start creates (default
  None: the layers keep theirs).
- ``LossPlotCallback`` draws ``loss.png`` from the log history at the end of training.
- Checkpoints appear only complete (``checkpointing.AtomicCheckpointMixin``); a nan/inf loss stops
  the run without saving the poisoned step (``guards.NonFiniteGuardMixin``).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from transformers import Trainer, TrainerCallback

from paretoq.quant.fused import set_kernels
from paretoq.quant.linear import flush_fake_quant_grads, set_fake_quant_cache
from paretoq.training.checkpointing import AtomicCheckpointMixin
from paretoq.training.guards import NonFiniteGuardMixin

logger = logging.getLogger(__name__)

SCALE_PARAM = "weight_clip_val"


class QATTrainer(NonFiniteGuardMixin, AtomicCheckpointMixin, Trainer):
    def __init__(self, *args, scale_lr_multiplier: float = 1.0, fake_quant_cache: bool = True,
                 quantizer_kernels=None, **kwargs):
        self.scale_lr_multiplier = scale_lr_multiplier
        self.quantizer_kernels = quantizer_kernels  # for the QuantLinear layers (fused.set_kernels); None: as they are
        super().__init__(*args, **kwargs)
        # Ŵ computed once per optimizer step (paretoq.quant.linear); not with DDP/FSDP/DeepSpeed,
        # whose gradient hooks need ∂L/∂W during backward. Only where it saves work: several
        # micro-batches per step, or gradient checkpointing's second forward. With one plain
        # micro-batch it would save nothing and hold Ŵ all step (in fp32 a full copy of the weights).
        self.fake_quant_cache = fake_quant_cache and self.accelerator.num_processes == 1 and self.args.n_gpu <= 1 \
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled) \
            and (self.args.gradient_accumulation_steps > 1 or bool(self.args.gradient_checkpointing))
        set_fake_quant_cache(self.model, self.fake_quant_cache)
        if self.quantizer_kernels is not None:
            set_kernels(self.model, self.quantizer_kernels)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.fake_quant_cache and self.accelerator.sync_gradients:
            flush_fake_quant_grads(model)  # before gradient clipping and the optimizer step
        return loss

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {"decay": [], "no_decay": [], "scales": []}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            key = "scales" if name.endswith(SCALE_PARAM) else "decay" if name in decay else "no_decay"
            groups[key].append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        lr = optimizer_kwargs.get("lr", self.args.learning_rate)
        param_groups = [
            {"params": groups["decay"], "weight_decay": self.args.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["scales"], "weight_decay": 0.0, "lr": lr * self.scale_lr_multiplier},
        ]
        self.optimizer = optimizer_cls([g for g in param_groups if g["params"]], **optimizer_kwargs)
        return self.optimizer


    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.x reads the checkpoint's config.json with the generic PreTrainedConfig only
        # to compare versions; for configs with LongRoPE `rope_scaling` (MiniCPM4, Phi-3) that
        # generic class fails its RoPE validation. Read it with the model's own config class.
        import transformers.trainer as hf_trainer

        generic = hf_trainer.PreTrainedConfig
        own = type(self.model.config)
        hf_trainer.PreTrainedConfig = own
        try:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            hf_trainer.PreTrainedConfig = generic


class LossPlotCallback(TrainerCallback):
    """Writes ``<output_dir>/loss.png``: training loss (and eval loss) against the step."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            try:
                plot_loss(state.log_history, os.path.join(args.output_dir, "loss.png"))
            except Exception as e:  # a plot must never fail a finished run
                logger.warning("could not draw loss.png: %s", e)


def plot_loss(log_history: list[dict], path: str) -> str | None:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("paretoq QAT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def scale_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith(SCALE_PARAM)]
