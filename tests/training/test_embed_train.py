"""paretoq train with --embed_bits / --a_bits: the embedding learns, checkpoints resume exactly, config saved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE, train_argv, stop_at
from paretoq.errors import UserError
from paretoq.loading import load_model
from paretoq.quant.embedding import QuantEmbedding, QuantTiedHead
from paretoq.training.args import parse_train_args
from paretoq.training.run import run_training

FLAGS = ["--embed_bits", "4", "--embed_group_size", "32", "--a_bits", "8", "--compile_quantizer", "false"]


def _losses(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def test_flags_reach_the_config():
    cfg = parse_train_args(train_argv("/tmp/unused", *FLAGS, head_bits=None))
    assert cfg.quant.describe() == "w_bits=2 group_size=None embed_bits=4 embed_group_size=32 a_bits=8"
    assert parse_train_args(train_argv("/tmp/unused")).quant.describe() == "w_bits=2 group_size=None"
    with pytest.raises(UserError, match="embed_bits 5 is not supported"):
        parse_train_args(train_argv("/tmp/unused", "--embed_bits", "5"))


def test_resume_with_quantized_embedding_is_exact(tmp_path):
    run_training(parse_train_args(train_argv(tmp_path / "straight", *FLAGS, steps=4, save_steps=2)))
    argv = train_argv(tmp_path / "resumed", *FLAGS, steps=4, save_steps=2)
    run_training(parse_train_args(argv), callbacks=[stop_at(2)])
    ckpt = load_file(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors")
    assert "model.embed_tokens.weight_clip_val" in ckpt and not any(k.startswith("lm_head.weight_clip") for k in ckpt)
    run_training(parse_train_args(argv))
    assert [s for s, _ in _losses(tmp_path / "resumed")] == [1, 2, 3, 4]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the embedding and its scales were trained (they moved from the initial model / reference init)
    start = load_model(FIXTURE, dtype=torch.float32).model.embed_tokens.weight
    assert not torch.equal(a["model.embed_tokens.weight"].float(), start)
    final = load_model(tmp_path / "straight")
    assert isinstance(final.model.embed_tokens, QuantEmbedding) and isinstance(final.lm_head, QuantTiedHead)
    qc = json.loads((tmp_path / "straight" / "config.json").read_text())["quantization_config"]
    assert (qc["embed_bits"], qc["embed_group_size"], qc["a_bits"]) == (4, 32, 8)
    # resuming with other table settings is refused, naming both
    with pytest.raises(UserError, match="trained with w_bits=2 group_size=None embed_bits=4 embed_group_size=32 "
                                        "a_bits=8, but this run asks for w_bits=2 group_size=None embed_bits=8"):
        run_training(parse_train_args(train_argv(tmp_path / "resumed", "--embed_bits", "8", "--a_bits", "8",
                                                 "--embed_group_size", "32", "--compile_quantizer", "false",
                                                 steps=6, save_steps=2)))
