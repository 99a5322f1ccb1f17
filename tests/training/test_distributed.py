"""Multi-process training: torchrun DDP on CPU (gloo) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURE, REPO, TEXT


def _train_args(out, per_device_bs):
    return ["train", "--input_model_filename", str(FIXTURE), "--train_data_local_path", str(TEXT / "kjv_train.jsonl"),
            "--eval_data_local_path", str(TEXT / "kjv_eval.jsonl"), "--w_bits", "2", "--output_dir", str(out),
            "--model_max_length", "32", "--per_device_train_batch_size", str(per_device_bs), "--max_steps", "3",
            "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "5", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true"]


def _losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_torchrun_two_processes_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    single = subprocess.run([sys.executable, "-m", "paretoq.cli", *_train_args(tmp_path / "one", 4)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "paretoq.cli", *_train_args(tmp_path / "two", 2), "--ddp_backend", "gloo"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, abs=1e-4)
    assert (tmp_path / "two" / "model.safetensors").is_file()
