"""Stop a run whose loss (or weights) stop being finite, without saving a poisoned checkpoint.

``NonFiniteGuardMixin`` (mixed into ``QATTrainer``) looks at every micro-batch's loss. A nan or
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


def _any_nonfinite(tensors) -> bool:
    return any(t.is_floating_point() and t.numel() and not torch.isfinite(t).all() for t in tensors)


class NonFiniteGuardMixin:
    """Trainer mixin: raise ``TrainingDiverged`` on a non-finite loss; never checkpoint non-finite weights."""

    _nonfinite_loss: torch.Tensor | None = None

    def _agreed(self, flag: bool) -> bool:
        """``flag`` or'ed over every process (no communication in a single-process run)."""
        if self.accelerator.num_processes <= 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        detached = loss.detach()
        if not torch.isfinite(detached).all() and self._nonfinite_loss is None:
            self._nonfinite_loss = detached.float().cpu()
        # Decide once per optimizer step (after its last micro-batch), before the optimizer runs.
        if self.accelerator.sync_gradients or self.accelerator.num_processes <= 1:
            bad = self._nonfinite_loss is not None
            if self._agreed(bad):
                value = "nan" if bad and torch.isnan(self._nonfinite_loss).any() else "inf" if bad else "non-finite"
                self._diverged(f"the training loss is {value} at step {self.state.global_step + 1}")
        return loss

    def _save_checkpoint(self, model, trial):
        params = [p.detach() for p in self.model.parameters()]
        if self._agreed(_any_nonfinite(params)):
            self._diverged(f"the weights contain nan/inf after step {self.state.global_step}")
        return super()._save_checkpoint(model, trial)

    def _diverged(self, what: str):
        from paretoq.training.checkpointing import latest_complete_checkpoint

        self._nonfinite_loss = None
        last = latest_complete_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved"
        raise TrainingDiverged(
            f"{what}: training stopped and this step was not saved; {kept}. Lower --learning_rate or clip the "
            f"gradients (--max_grad_norm) and train into a new --output_dir (resuming keeps the saved optimizer)")
