"""DeepSpeed on CPU: a ZeRO-2 smoke test, and ZeRO-3 (2 processes) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, train_argv

pytestmark = pytest.mark.slow


def test_zero2_trains_and_saves_scales(tmp_path):
    pytest.importorskip("deepspeed", reason="installed by `make test` (extra paretoq[deepspeed])")
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29541",
           "-m", "paretoq", "train", *train_argv(out, steps=2, deepspeed=REPO / "configs" / "deepspeed_zero2.json",
                                                 optim="adamw_torch")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(l == l and l < 10 for l in losses)
    assert (out / "checkpoint-2").is_dir()
    from transformers import AutoModelForCausalLM

    import paretoq  # noqa: F401 -- registers the MiniCPM classes and the "paretoq" quantizer
    model = AutoModelForCausalLM.from_pretrained(out)
    scale = model.model.layers[0].self_attn.q_proj.weight_clip_val
    assert scale.shape == (128, 1) and torch.isfinite(scale).all() and (scale > 0).all()



def test_zero3_two_processes_match_one_process_and_consolidate_the_scales(tmp_path):
    """ZeRO-3 partitions the weights while loading; the scales must still be initialised from the
    whole weights, train like a single process with the same global batch, and come back whole in
    the saved model and checkpoint."""
    pytest.importorskip("deepspeed", reason="installed by `make test` (extra paretoq[deepspeed])")
    from test_distributed import assert_sharded_run_matches_single_process

    assert_sharded_run_matches_single_process(tmp_path, "z3", 29543, [
        "--deepspeed", str(REPO / "configs" / "deepspeed_zero3.json"), "--optim", "adamw_torch"])


def test_zero3_refuses_distillation_in_one_line(tmp_path):
    """Started without a launcher the run is a world of one; KD under ZeRO-3 stops before writing."""
    pytest.importorskip("deepspeed", reason="installed by `make test` (extra paretoq[deepspeed])")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    out = tmp_path / "kd"
    argv = train_argv(out, steps=2, eval_data_local_path=None, deepspeed=REPO / "configs" / "deepspeed_zero3.json",
                      kd_weight=0.5)
    run = subprocess.run([sys.executable, "-m", "paretoq", "train", *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "paretoq train: error: --kd_weight needs a whole FP teacher copy on every rank, which DeepSpeed ZeRO-3 "
        "cannot shard: use configs/deepspeed_zero2.json (or DDP) for distillation")
    assert not out.exists()
