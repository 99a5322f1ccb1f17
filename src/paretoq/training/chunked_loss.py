"""Causal-LM cross-entropy without the whole sequence's logits at once.

A causal LM's plain loss makes the logits of every position, (tokens × vocab) in fp32: for
MiniCPM4 (73,448 tokens) at 4×2048 tokens that is 2.4 GB, and as much again for their gradient.
``chunked_causal_lm_loss`` runs the LM head and the cross-entropy over ``chunk`` positions at a
time under activation checkpointing: only one chunk's logits exist, in forward and in backward
(where they are recomputed), at the cost of one more LM-head product per chunk. On a GPU with
liger-kernel installed, its fused linear cross-entropy does the same in Triton kernels.

``hidden_states_and_head`` gets the hidden states the LM head would read, from any HF causal LM
whose logits are ``lm_head(f(h))`` for some f inside the model's forward (MiniCPM's division by
hidden_size/dim_model_base included): the output embedding is swapped for a module that records
its input for the length of one forward. Models that transform the logits after the head
(soft-capping, logit scales) are not eligible (``eligible``); they keep the plain loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024
# config attributes of models whose logits are transformed after the LM head (Gemma 2, Cohere, Granite, ...)
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def eligible(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its output embedding's output (so it can be chunked)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or not isinstance(head, nn.Linear):
        return False
    return all(getattr(config, key, None) in (None, 1, 1.0) for key in _POST_HEAD)


class _Capture(nn.Module):
    """Stands in for the LM head for one forward: keeps its input, returns an empty tensor."""

    def __init__(self):
        super().__init__()
        self.hidden = None

    def forward(self, x):
        self.hidden = x
        return x[..., :0]


def hidden_states_and_head(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, nn.Linear]:
    """The LM head's input for ``inputs`` (no labels given to the model) and the head itself."""
    head = model.get_output_embeddings()
    capture = _Capture()
    model.set_output_embeddings(capture)
    try:
        feed = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model(**feed, use_cache=False)
    finally:
        model.set_output_embeddings(head)
    if capture.hidden is None:
        raise RuntimeError(f"{type(model).__name__} did not call its output embedding")
    return capture.hidden, head


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                           num_items_in_batch=None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted by one, ``-100`` ignored; Σ CE / ``num_items_in_batch``
    when given, else the mean over counted tokens) from the hidden states, ``chunk`` positions at a time."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = head.weight, head.bias
    fused = _liger_loss() if h.is_cuda else None
    if fused is not None:
        total = fused(weight, h, shifted, bias) if bias is not None else fused(weight, h, shifted)
    else:
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            part = shifted[start:start + chunk]
            if not (part != IGNORE_INDEX).any():
                continue
            total = total + checkpoint(_chunk_loss, h[start:start + chunk], weight, bias, part, use_reentrant=False)
    if num_items_in_batch is None:
        return total / (shifted != IGNORE_INDEX).sum().clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _liger_loss():
    """liger-kernel's fused linear cross-entropy (sum over tokens) where it is installed, else None."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
