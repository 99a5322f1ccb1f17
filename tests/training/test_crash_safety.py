"""Crash safety of `paretoq train`: atomic checkpoints, exact resume after SIGKILL, the nan/inf guard.

- A checkpoint folder appears only complete: a save that dies half-way leaves ``.tmp-checkpoint-N``,
  which the next run deletes, and resume continues from the last complete checkpoint.
- A run killed with SIGKILL mid-training and started again with the same command ends with the same
  loss log and the same weights, bit for bit, as a run that was never interrupted (CPU, fp32).
- A nan loss stops the run with a message naming the step, keeps the last good checkpoint and saves
  nothing poisoned; through the CLI it is one error line and a non-zero exit status.
"""

from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import train_argv
from paretoq.training.args import parse_train_args
from paretoq.training.checkpointing import latest_complete_checkpoint, remove_leftovers
from paretoq.training.guards import TrainingDiverged
from paretoq.training.run import find_resume_checkpoint, run_training
from paretoq.training.trainer import QATTrainer


RUN = dict(steps=6, save_total_limit=2)  # checkpoints every 2 steps (train_argv's default), the last two kept


def _losses(out: Path) -> list[tuple[int, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted in-process run: the reference."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_training(parse_train_args(train_argv(out, **RUN)))
    return out


# --- finding checkpoints -----------------------------------------------------------------------


def test_resume_skips_incomplete_checkpoints_and_removes_leftovers(tmp_path):
    out = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    (out / ".tmp-checkpoint-8" / "checkpoint-8").mkdir(parents=True)
    (out / ".tmp-final-model").mkdir()
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-4")
    cfg = parse_train_args(train_argv(out, **RUN))
    assert find_resume_checkpoint(cfg) == str(out / "checkpoint-4")
    assert not list(out.glob(".tmp-*"))
    assert (out / "checkpoint-6").is_dir()  # skipped, not deleted: the next save of step 6 replaces it
    assert remove_leftovers(tmp_path / "absent") == []


# --- a save that dies half-way -----------------------------------------------------------------


class _Boom(Exception):
    pass


def test_interrupted_save_leaves_no_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    original = QATTrainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise _Boom("killed while writing checkpoint-4")
        return original(self, output_dir)

    monkeypatch.setattr(QATTrainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(_Boom):
        run_training(parse_train_args(train_argv(out, **RUN)))
    monkeypatch.undo()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists()  # never visible half-written
    staged = out / ".tmp-checkpoint-4" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file() and not (staged / "trainer_state.json").exists()

    metrics = run_training(parse_train_args(train_argv(out, **RUN)))  # the same command again
    assert not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # rotation (limit 2)
    assert _losses(out) == _losses(straight)
    assert _same_weights(out, straight)
    assert math.isfinite(metrics["eval_loss"])
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_outputs_are_written_complete(straight):
    """Final model: config.json + weights + tokenizer, no temporary left; results JSONs parse."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "all_results.json",
                 "train_results.json", "eval_results.json"):
        assert (straight / name).is_file(), name
    assert not list(straight.glob(".tmp-*"))
    results = json.loads((straight / "all_results.json").read_text())
    assert {"eval_loss", "train_loss", "perplexity"} <= results.keys()
    for ckpt in straight.glob("checkpoint-*"):
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "model.safetensors").is_file()
        assert not list(ckpt.glob(".tmp-*"))


# --- SIGKILL in the middle of training ----------------------------------------------------------


def _cli(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "paretoq.cli", "train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow  # a real process killed mid-run and run again (the interrupted-save test covers resume fast)
def test_sigkill_mid_run_then_same_command_equals_uninterrupted_run(tmp_path):
    steps, save = 8, 2
    ref, out = tmp_path / "ref", tmp_path / "run"
    shared = ("--cache_dir", str(tmp_path / "cache"))  # tokenise once for the three runs
    r = _cli(train_argv(ref, *shared, steps=steps, save_steps=save))
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err

    p = _cli(train_argv(out, *shared, steps=steps, save_steps=save))
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-4").is_dir():  # appears only complete (atomic rename)
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # somewhere in steps 5..8, or writing a later checkpoint
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    assert latest_complete_checkpoint(out) in (str(out / "checkpoint-4"), str(out / "checkpoint-6"))

    r = _cli(train_argv(out, *shared, steps=steps, save_steps=save))
    _, err = r.communicate(timeout=600)
    assert r.returncode == 0, err
    assert not list(out.glob(".tmp-*"))
    assert [s for s, _ in _losses(out)] == list(range(1, steps + 1))
    assert _losses(out) == _losses(ref)
    assert _same_weights(out, ref)


# --- nan / inf -----------------------------------------------------------------------------------


class _PoisonAt(TrainerCallback):
    """Sets one weight to nan at the start of step ``step``: that step's loss is nan."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*last good checkpoint is .*checkpoint-3"):
        run_training(parse_train_args(train_argv(out, steps=6, save_steps=1, save_total_limit=2)),
                     callbacks=[_PoisonAt(4)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(".tmp-*")) and not (out / "model.safetensors").exists()
    weights = load_file(out / "checkpoint-3" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_loss_through_the_cli_is_one_error_line(tmp_path):
    """A learning rate of 1e30 makes the weights overflow after the first update."""
    out = tmp_path / "run"
    p = _cli(train_argv(out, bits=16, steps=4, save_steps=1, learning_rate=1e30))
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 2, stderr
    assert "Traceback" not in stderr + stdout
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == stderr.splitlines()[-1], stderr
    assert errors[0].startswith("paretoq train: error: ") and re.search(r"step \d+", errors[0])
    assert not (out / "model.safetensors").exists() and not list(out.glob(".tmp-*"))
