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
