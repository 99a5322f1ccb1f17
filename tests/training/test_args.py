"""`paretoq train` arguments: seed flags, YAML config < CLI, shipped configs parse, resolved config written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import REPO
from paretoq.errors import UserError
from paretoq.training.args import parse_train_args

BASE = ["--input_model_filename", "m", "--train_data_local_path", "t.jsonl", "--output_dir", "o", "--w_bits", "2"]

# SPEC §4: a seed user's command line (from run_train_minicpm.sh), unchanged
SEED_COMMAND = [
    "--local_dir", "/tmp/seed", "--input_model_filename", "MiniCPM4-0_5B", "--output_model_filename", "minicpm_quantized",
    "--train_data_local_path", "train.jsonl", "--eval_data_local_path", "eval.jsonl", "--do_train", "True",
    "--do_eval", "True", "--model_max_length", "2048", "--fp16", "False", "--bf16", "True", "--log_on_each_node",
    "False", "--logging_dir", "/tmp/seed/logs", "--num_train_epochs", "3", "--per_device_train_batch_size", "1",
    "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "8", "--save_strategy", "steps",
    "--save_steps", "500", "--eval_steps", "500", "--learning_rate", "5e-5", "--weight_decay", "0.",
    "--warmup_steps", "100", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--gradient_checkpointing",
    "True", "--qat", "True", "--w_bits", "4", "--contain_weight_clip_val", "False", "--output_dir", "/tmp/seed/output",
    "--cache_dir", "/tmp/seed/cache",
]


def test_seed_command_line_parses_unchanged():
    cfg = parse_train_args(SEED_COMMAND)
    assert cfg.quant.w_bits == 4 and cfg.training.bf16 and cfg.training.gradient_accumulation_steps == 8
    assert cfg.final_model_dir == "/tmp/seed/models/minicpm_quantized"
    assert cfg.run.logging_dir == "/tmp/seed/logs" and cfg.data.cache_dir == "/tmp/seed/cache"


def test_seed_ternary_spelling_and_defaults():
    cfg = parse_train_args(BASE + ["--w_bits", "0"])
    assert cfg.quant.w_bits == 1.58 and cfg.quant.group_size is None
    assert cfg.training.report_to == ["tensorboard"] and cfg.training.weight_decay == 0.0


def test_yaml_config_is_overridden_by_cli(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"w_bits": "2", "group_size": 64, "learning_rate": 3e-4, "max_steps": 7,
                                 "input_model_filename": "m", "train_data_local_path": "t.jsonl",
                                 "output_dir": str(tmp_path / "o")}))
    cfg = parse_train_args(["--config", str(y), "--learning_rate", "1e-5"])
    assert cfg.quant.w_bits == 2 and cfg.quant.group_size == 64 and cfg.training.max_steps == 7
    assert cfg.training.learning_rate == 1e-5
    path = cfg.save(tmp_path)
    saved = yaml.safe_load(open(path))
    assert saved["w_bits"] == "2" and saved["learning_rate"] == 1e-5 and saved["group_size"] == 64


@pytest.mark.parametrize("yaml_file", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_parses(yaml_file):
    cfg = parse_train_args(["--config", str(yaml_file)])
    assert cfg.quant.enabled and cfg.model.input_model_filename and cfg.data.train_data_local_path


@pytest.mark.parametrize("json_file", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_json_configs_are_json(json_file):
    assert isinstance(json.loads(json_file.read_text()), dict)


@pytest.mark.parametrize("argv, message", [
    (["--train_data_local_path", "t", "--output_dir", "o", "--w_bits", "2"], r"^missing --input_model_filename \("),
    (["--input_model_filename", "m", "--output_dir", "o", "--w_bits", "2"], r"^missing --train_data_local_path \("),
    (["--input_model_filename", "m", "--train_data_local_path", "t", "--w_bits", "2"], r"^missing --output_dir \("),
    (["--input_model_filename", "m", "--train_data_local_path", "t", "--output_dir", "o"], r"^missing --w_bits \("),
    ([], r"^missing --input_model_filename, --train_data_local_path, --w_bits, --output_dir \(.*paretoq demo"),
    (BASE + ["--w_bits", "5"], "w_bits 5 is not supported"),
    (BASE + ["--group_size", "0"], "group_size must be a positive integer"),
    (BASE + ["--model_max_length", "0"], "--model_max_length must be a positive"),
    (BASE + ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (BASE + ["--config", "/nonexistent.yaml"], "--config /nonexistent.yaml: no such file"),
])
def test_bad_flags_say_what_is_wrong(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv)


def test_unknown_key_in_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("w_bitz: 2\n")
    with pytest.raises(UserError, match="unknown option.*w_bitz"):
        parse_train_args(BASE + ["--config", str(y)])


def test_compile_quantizer_switch(monkeypatch):
    """auto (the default) fuses the quantizer when training on CPU or a CUDA GPU (the Triton kernels);
    $PARETOQ_COMPILE_QUANTIZER sets the default, the command line overrides it; other spellings of
    true/false are accepted."""
    monkeypatch.delenv("PARETOQ_COMPILE_QUANTIZER", raising=False)
    cfg = parse_train_args(BASE)
    assert cfg.run.compile_quantizer == "auto" and cfg.fused_quantizer is (cfg.training.use_cpu or torch.cuda.is_available())
    assert parse_train_args(BASE + ["--use_cpu", "true"]).fused_quantizer is True
    off_cpu = parse_train_args(BASE + ["--use_cpu", "false"])
    refused = parse_train_args(BASE + ["--use_cpu", "false", "--compile_quantizer", "no"])
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert off_cpu.fused_quantizer is False  # neither CPU nor a CUDA GPU (e.g. MPS): eager
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert off_cpu.fused_quantizer is True  # a CUDA GPU: the Triton kernels
        assert refused.fused_quantizer is False
    assert parse_train_args(BASE + ["--use_cpu", "false", "--compile_quantizer", "yes"]).fused_quantizer is True
    monkeypatch.setenv("PARETOQ_COMPILE_QUANTIZER", "false")
    assert parse_train_args(BASE + ["--use_cpu", "true"]).fused_quantizer is False
    cfg = parse_train_args(BASE + ["--use_cpu", "true", "--compile_quantizer", "auto"])
    assert cfg.run.compile_quantizer == "auto" and cfg.fused_quantizer is True
    with pytest.raises(UserError, match=r"^--compile_quantizer must be auto, true or false, got 'fast' "):
        parse_train_args(BASE + ["--compile_quantizer", "fast"])
    monkeypatch.setenv("PARETOQ_COMPILE_QUANTIZER", "on")
    with pytest.raises(UserError, match=r"got 'on' \(the default comes from \$PARETOQ_COMPILE_QUANTIZER"):
        parse_train_args(BASE)
