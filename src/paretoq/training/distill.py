"""Knowledge distillation from the full-precision model during QAT.

    loss = (1 − w)·CE + w·T²·KL(p_teacher^T ‖ p_student^T)

with p^T = softmax(logits / T), token-level over the positions whose (shifted) label is not
−100 — exactly the tokens the cross-entropy counts (Hinton et al. 2015; the T² keeps the
gradient scale of the soft term independent of T). Both terms are sums over tokens divided by
the same count: ``num_items_in_batch`` (the tokens of the whole accumulated batch, which the
Trainer passes so that gradient accumulation is exact) when given, else the micro-batch's own
count. With ``kd_weight = 0`` the loss *is* the Trainer's (same call, same numbers).

The teacher is a frozen copy of the model as loaded, before quantization (``make_teacher``), run
under ``no_grad`` in eval mode — optionally held in bf16 to halve its memory — and under the same
bf16 autocast as the student when ``--bf16`` is on. It is not part of the model: it is neither
saved nor seen by the optimizer. Evaluation (``model.training`` False) always reports plain CE,
so eval perplexity stays comparable across runs.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

TEACHER_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def make_teacher(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """A frozen eval-mode copy of ``model`` (call it before ``quantize_model``) in ``dtype``."""
    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"teacher dtype {dtype!r}: use one of fp32, bf16")
    teacher = copy.deepcopy(model).to(TEACHER_DTYPES[dtype]).eval()
    teacher.requires_grad_(False)
    return teacher


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, int]:
    """Σ over predicting positions with a label ≠ −100 of KL(p_t^T ‖ p_s^T), and how many there were.

    Logits are (batch, seq, vocab) at positions 0..L−1, labels (batch, seq); position t predicts
    label t+1 (the causal-LM shift). Computed in fp32.
    """
    valid = labels[:, 1:] != -100
    s = student_logits[:, :-1][valid].float() / temperature
    t = teacher_logits[:, :-1][valid].float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return kl, int(valid.sum())


class DistillationMixin:
    """Trainer mixin: ``compute_loss`` adds the KD term while training (see the module docstring)."""

    def __init__(self, *args, teacher: nn.Module | None = None, kd_weight: float = 0.0, kd_temperature: float = 1.0,
                 **kwargs):
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be positive, got {kd_temperature}")
        if kd_weight > 0 and teacher is None:
            raise ValueError("kd_weight > 0 needs a teacher model (make_teacher(model) before quantize_model)")
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.teacher = teacher if kd_weight > 0 else None
        super().__init__(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.to(self.args.device)

    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        feed = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        device = self.args.device.type
        amp = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        with torch.no_grad(), torch.autocast(device_type=device, dtype=amp or torch.float32, enabled=amp is not None):
            return self.teacher(**feed, use_cache=False).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        kl_sum, count = distillation_kl(outputs.logits, self._teacher_logits(inputs), labels, self.kd_temperature)
        if num_items_in_batch is not None:
            # the Trainer's normalisation of the CE part: Σ / tokens of the accumulated batch, times
            # the number of processes when tokens are averaged across devices (see Trainer.compute_loss)
            kl = kl_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                kl = kl * (self.accelerator.num_processes // self.get_tp_size())
        else:
            kl = kl_sum / max(count, 1)
        w, temp = self.kd_weight, self.kd_temperature
        loss = (1.0 - w) * ce + w * temp * temp * kl.to(ce.dtype)
        return (loss, outputs) if return_outputs else loss
