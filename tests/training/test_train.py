"""`paretoq train` on the tiny MiniCPM4 fixture: outputs, reload, grad accumulation, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import FIXTURE, TEXT
from paretoq import QuantLinear
from paretoq.cli import main as cli
from paretoq.training.args import parse_train_args
from paretoq.training.run import run_training


def _argv(out, bits, *extra):
    return ["--input_model_filename", str(FIXTURE), "--train_data_local_path", str(TEXT / "kjv_train.jsonl"),
            "--eval_data_local_path", str(TEXT / "kjv_eval.jsonl"), "--w_bits", str(bits), "--output_dir", str(out),
            "--model_max_length", "32", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8",
            "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--seed", "11", "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra]


class _Capture(TrainerCallback):
    """Keeps the model object at the end of training and the gradients before each optimizer step."""

    def __init__(self):
        self.model = None
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_train_end(self, args, state, control, model=None, **kw):
        self.model = model


@pytest.mark.parametrize("bits", [pytest.param(b, marks=[] if b == 2 else [pytest.mark.slow]) for b in (1, 1.58, 2, 3, 4)])
def test_cli_train_writes_every_output(tmp_path, bits):
    out = tmp_path / "run"
    assert cli(["train", *_argv(out, bits)]) == 0
    for name in ("trainer_state.json", "train_results.json", "eval_results.json", "all_results.json",
                 "paretoq_config.yaml", "loss.png", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "optimizer.pt").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(results["perplexity"]) and results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and len([h for h in state["log_history"] if "loss" in h]) == 4
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events missing"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["w_bits"] == bits and qc["format"] == "fake"
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight_clip_val"].shape == (128, 1)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reloaded_final_model_equals_trained_model(tmp_path):
    cap = _Capture()
    cfg = parse_train_args(_argv(tmp_path / "run", 2, "--group_size", "32"))
    metrics = run_training(cfg, callbacks=[cap])
    trained = cap.model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(metrics["final_model_dir"]).eval()
    assert isinstance(reloaded.model.layers[2].mlp.down_proj, QuantLinear)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, reloaded(ids).logits)
    # the scales were trained (moved away from the reference init)
    init = AutoModelForCausalLM.from_pretrained(FIXTURE)
    from paretoq import QuantConfig, quantize_model

    quantize_model(init, QuantConfig(w_bits=2, group_size=32))
    a0 = init.model.layers[0].self_attn.q_proj.weight_clip_val
    a1 = reloaded.model.layers[0].self_attn.q_proj.weight_clip_val
    assert a1.shape == (128, 4) and not torch.equal(a0, a1)


def test_gradient_accumulation_is_exact(tmp_path):
    """1 step of batch 4 and 4 micro-batches of 1 give the same gradients (fp32, 1e-5 relative)."""
    grads = []
    for bs, ga in ((4, 1), (1, 4)):
        cap = _Capture()
        cfg = parse_train_args(_argv(tmp_path / f"bs{bs}", 3, "--per_device_train_batch_size", str(bs),
                                     "--gradient_accumulation_steps", str(ga), "--max_steps", "1",
                                     "--save_strategy", "no", "--report_to", "none"))
        run_training(cfg, callbacks=[cap])
        grads.append(cap.grads[0])
    a, b = grads
    assert a.keys() == b.keys() and any(k.endswith("weight_clip_val") for k in a)
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert ((a[k] - b[k]).abs().max() / scale) < 1e-5, k


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_gives_identical_losses_and_weights(tmp_path):
    argv = _argv(tmp_path / "straight", 2, "--max_steps", "6", "--save_steps", "3", "--report_to", "none")
    run_training(parse_train_args(argv))
    argv_b = _argv(tmp_path / "resumed", 2, "--max_steps", "6", "--save_steps", "3", "--report_to", "none")
    run_training(parse_train_args(argv_b), callbacks=[_StopAt(3)])  # "killed" after the step-3 checkpoint
    assert not (tmp_path / "resumed" / "checkpoint-6").exists()
    run_training(parse_train_args(argv_b))  # the same command again continues from checkpoint-3

    def losses(run):
        state = json.loads((tmp_path / run / "trainer_state.json").read_text())
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    assert [s for s, _ in losses("resumed")] == [1, 2, 3, 4, 5, 6]
    assert losses("resumed") == losses("straight")
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
