"""Stop a run whose loss (or weights) stop being finite, without saving a poisoned checkpoint.

``QATTrainer.training_step`` looks at every micro-batch's loss with these helpers. A nan or
inf loss raises ``TrainingDiverged`` at the end of that optimizer step's micro-batches, before the
optimizer applies the bad gradients and before any checkpoint of the step is written; the
checkpoints already on disk (each saved only with finite weights) are kept. Before every
checkpoint the weights themselves are checked too, so a finite loss followed by an overflowing
update is not saved either. With several processes the flag is agreed on with one tiny all-reduce
per optimizer step, so every process stops at the same step.

``TrainingDiverged`` is a ``UserError`` (the usual cause is the learning rate): the CLI prints its
one-line message and exits with status 2.
"""

from __future__ import annotations

import torch

from paretoq.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the weights became nan/inf; the message names the step and the last good checkpoint."""


def any_nonfinite(tensors) -> bool:
    return any(t.is_floating_point() and t.numel() and not torch.isfinite(t).all() for t in tensors)


def agreed(accelerator, flag: bool, device) -> bool:
    """``flag`` or'ed over every process (no communication in a single-process run)."""
    if accelerator.num_processes <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def diverged(what: str, output_dir: str):
    """Raise ``TrainingDiverged``: ``what`` went wrong, naming the last good checkpoint of ``output_dir``."""
    from paretoq.training.checkpointing import latest_complete_checkpoint

    last = latest_complete_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved"
    raise TrainingDiverged(
        f"{what}: training stopped and this step was not saved; {kept}. Lower --learning_rate or clip the "
        f"gradients (--max_grad_norm) and train into a new --output_dir (resuming keeps the saved optimizer)")
