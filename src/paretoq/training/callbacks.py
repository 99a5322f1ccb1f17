"""Callbacks of a ``paretoq train`` run: the last step is always logged, and the loss plot."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from paretoq.files import atomic_file

logger = logging.getLogger(__name__)


class LogLastStepCallback(TrainerCallback):
    """Logs the loss of the last step too, so a run shorter than (or not a multiple of)
    ``--logging_steps`` still has its final loss in the log, TensorBoard and ``loss.png``."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True
        return control


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
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
