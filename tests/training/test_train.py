"""`paretoq train` on the tiny MiniCPM4 fixture: outputs, reload, grad accumulation, resume, the scales' optimizer
group, the data order."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import FIXTURE, TEXT, tiny_llama, train_argv, stop_at
from paretoq import QuantLinear
from paretoq.cli import main as cli
from paretoq.training.args import parse_train_args
from paretoq.training.run import run_training


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
    assert cli(["train", *train_argv(out, bits=bits, report_to=None)]) == 0  # the default reports to TensorBoard
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
    cfg = parse_train_args(train_argv(tmp_path / "run", group_size=32))
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
        cfg = parse_train_args(train_argv(tmp_path / f"bs{bs}", bits=3, steps=1, per_device_train_batch_size=bs,
                                          gradient_accumulation_steps=ga, save_strategy="no"))
        run_training(cfg, callbacks=[cap])
        grads.append(cap.grads[0])
    a, b = grads
    assert a.keys() == b.keys() and any(k.endswith("weight_clip_val") for k in a)
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert ((a[k] - b[k]).abs().max() / scale) < 1e-5, k


def test_resume_gives_identical_losses_and_weights(tmp_path):
    run_training(parse_train_args(train_argv(tmp_path / "straight", steps=6, save_steps=3)))
    argv_b = train_argv(tmp_path / "resumed", steps=6, save_steps=3)
    run_training(parse_train_args(argv_b), callbacks=[stop_at(3)])  # "killed" after the step-3 checkpoint
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


# --- the optimizer's scale group, and the data order -----------------------------------------------------------


def _one_decay_only_step(tmp_path, create_optimizer, weight_decay=0.5, lr=1e-2):
    """One AdamW step with every gradient zero, so that only weight decay moves a parameter; the
    optimizer built by ``create_optimizer`` (a QATTrainer's, or another grouping as a control).
    Returns {name: (before, after)} and the optimizer."""
    from transformers import TrainingArguments

    from paretoq import QuantConfig, quantize_model
    from paretoq.training.trainer import QATTrainer

    model = tiny_llama(layers=1, hidden=32, vocab=64)
    quantize_model(model, QuantConfig(w_bits=2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, weight_decay=weight_decay,
                             learning_rate=lr, optim="adamw_torch")
    trainer = QATTrainer(model=model, args=args)
    optimizer = create_optimizer(trainer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {n: (before[n], p.detach()) for n, p in model.named_parameters()}, optimizer


def _assert_scales_not_decayed(params, optimizer, weight_decay=0.5, lr=1e-2):
    scales = [n for n in params if n.endswith("weight_clip_val")]
    group = [g for g in optimizer.param_groups if g.get("paretoq_scales")]
    assert len(scales) == 7 and len(group) == 1 and len(group[0]["params"]) == 7 and group[0]["weight_decay"] == 0.0
    for n in scales:
        assert torch.equal(params[n][1], params[n][0]), f"{n} was decayed"
    decayed = "model.layers.0.mlp.down_proj.weight"  # latent weights decay as transformers decays them
    torch.testing.assert_close(params[decayed][1], params[decayed][0] * (1 - lr * weight_decay), rtol=1e-6, atol=0)


def test_weight_decay_spares_the_scales(tmp_path):
    """The scales sit in their own group (``paretoq_scales``) with weight decay 0: a step whose gradients are all
    zero moves them by nothing, while AdamW's decoupled decay shrinks the latent weights by 1 − LR·wd."""
    from paretoq.training.trainer import QATTrainer

    params, optimizer = _one_decay_only_step(tmp_path, QATTrainer.create_optimizer)
    _assert_scales_not_decayed(params, optimizer)


def test_weight_decay_control_plain_grouping_decays_the_scales(tmp_path):
    """Negative control: transformers' own grouping (decay for every weight matrix and non-norm parameter, no scale
    group) puts the scales in the decayed group; the check above rejects it."""
    from transformers import Trainer

    params, optimizer = _one_decay_only_step(tmp_path, Trainer.create_optimizer)
    with pytest.raises(AssertionError):
        _assert_scales_not_decayed(params, optimizer)
    scale = params["model.layers.0.self_attn.q_proj.weight_clip_val"]
    torch.testing.assert_close(scale[1], scale[0] * (1 - 1e-2 * 0.5), rtol=1e-6, atol=0)


def _first_batches(tmp_path, monkeypatch, seed, steps=3):
    """The input_ids of the first ``steps`` training batches of a real run with ``--seed seed``."""
    from paretoq.training.trainer import QATTrainer

    seen = []
    original = QATTrainer.training_step

    def recording(self, model, inputs, num_items_in_batch=None):
        seen.append(inputs["input_ids"].clone())
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(QATTrainer, "training_step", recording)
    out = tmp_path / f"seed{seed}-{len(list(tmp_path.iterdir()))}"
    run_training(parse_train_args(train_argv(out, steps=steps, seed=seed, save_strategy="no",
                                             cache_dir=tmp_path / "tokens")))
    monkeypatch.undo()
    return seen


def test_training_data_is_shuffled_by_the_seed(tmp_path, monkeypatch):
    """Same --seed: the same blocks in the same order; another seed: another order; and neither is the file's."""
    from paretoq.data import build_datasets
    from paretoq.loading import load_tokenizer

    a, again, other = (_first_batches(tmp_path, monkeypatch, seed) for seed in (11, 11, 12))
    assert len(a) == len(again) == len(other) == 3
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not all(torch.equal(x, y) for x, y in zip(a, other))
    train, _ = build_datasets(load_tokenizer(FIXTURE), TEXT / "kjv_train.jsonl", TEXT / "kjv_eval.jsonl", block_size=32)
    index = {tuple(row.tolist()): i for i, row in enumerate(train.blocks)}
    for batches in (a, other):
        order = [index[tuple(row.tolist())] for batch in batches for row in batch]  # each row is a training block
        assert order != sorted(order) and len(set(order)) == len(order), order
