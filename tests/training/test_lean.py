"""Lean precision mode (``--master_weights bf16``): bf16 weights and gradients, fp32 scales, torchao's
low-bit AdamW with stochastic rounding; the training-state bytes it holds; flags and their errors;
a CLI run on the fixture that resumes exactly and whose final model loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from conftest import FIXTURE, tiny_llama, train_argv, stop_at
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.errors import UserError
from paretoq.training import lean
from paretoq.training.args import parse_train_args
from paretoq.training.run import run_training

torchao_optim = pytest.importorskip("torchao.optim", reason="lean mode needs torchao (make install installs it)")


def _lean_model(hidden=256, layers=1):
    model = tiny_llama(layers=layers, hidden=hidden, vocab=256)
    quantize_model(model, QuantConfig(w_bits=2))
    return model


# --- what lean mode holds -------------------------------------------------------------------------------


def test_to_lean_keeps_scales_fp32_and_ties():
    model = tiny_llama(layers=1, hidden=64, vocab=128)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize_model(model, QuantConfig(w_bits=2))
    assert lean.to_lean(model) > 0 and lean.is_lean(model)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith("weight_clip_val") else torch.bfloat16), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(m.cache_quantized_weight for m in model.modules() if isinstance(m, QuantLinear))


def _state_after_one_step(model, optimizer):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return lean.training_state_bytes(model, optimizer)


def test_training_state_bytes_lean_vs_fp32():
    """fp32 master + AdamW: exactly 16 bytes/parameter. Lean + 8-bit AdamW: 2 (W) + 2 (G) + per state 1 byte
    and an fp32 scale per 256 values (and a 256-entry fp32 code map) where torchao quantizes the state (tensors
    of ≥ 4096 values), the
    parameter's own dtype elsewhere; the fp32 scales count 4 + 4 + 8. Computed here tensor by tensor."""
    fp32 = _lean_model()
    got = _state_after_one_step(fp32, torch.optim.AdamW(fp32.parameters(), lr=1e-3))
    assert got["per_parameter"] == 16.0

    model = _lean_model()
    lean.to_lean(model)
    opt = torchao_optim.AdamW8bit(model.parameters(), lr=1e-3, bf16_stochastic_round=True)
    got = _state_after_one_step(model, opt)
    expected, n = 0, 0
    for p in model.parameters():
        n += p.numel()
        size = p.element_size()
        quantized = p.numel() >= 4096 and p.numel() % 256 == 0
        state = (p.numel() + p.numel() // 256 * 4 + 256 * 4) if quantized else p.numel() * size  # + its 256-level map
        expected += 2 * size * p.numel() + 2 * state
    assert got["parameters"] == n and got["weights"] + got["gradients"] + got["optimizer"] == expected
    assert 6.0 < got["per_parameter"] < 6.1  # 2 + 2 + 2 × (1 + 4/256), plus the small fp32 tensors


def test_stochastic_rounding_keeps_updates_below_bf16_spacing():
    """Weights at 1.0 (bf16 spacing 2^-7 above, 2^-8 below), gradient 1 everywhere, LR 1e-4 for 20 steps:
    each AdamW update (≈ LR) is below half the spacing, so round-to-nearest loses all of them (the control)
    while stochastic rounding moves the mean by ≈ 20 × 1e-4 = 2e-3."""
    moved = {}
    for sr in (True, False):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(256, 256, dtype=torch.bfloat16))
        opt = torchao_optim.AdamW8bit([p], lr=1e-4, weight_decay=0.0, bf16_stochastic_round=sr)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[sr] = 1.0 - p.detach().float().mean().item()
    assert moved[False] == 0.0
    assert moved[True] == pytest.approx(2e-3, rel=0.1)


def test_trainer_turns_stochastic_rounding_on_for_bf16_weights(tmp_path):
    from paretoq.training.trainer import QATTrainer

    for lean_mode in (True, False):
        model = _lean_model(hidden=64)
        if lean_mode:
            lean.to_lean(model)
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, optim="adamw_torch_8bit",
                                 gradient_checkpointing=True)
        trainer = QATTrainer(model=model, args=args)
        opt = trainer.create_optimizer()
        assert type(opt).__name__ == "AdamW8bit" and bool(opt.bf16_stochastic_round) is lean_mode
        assert trainer.fake_quant_cache is not lean_mode  # lean: no Ŵ copy held for the step


# --- flags ----------------------------------------------------------------------------------------------


def test_master_weights_flags(tmp_path):
    assert str(parse_train_args(train_argv(tmp_path)).training.optim.value) != "adamw_torch_8bit"
    cfg = parse_train_args(train_argv(tmp_path, master_weights="bf16"))
    assert cfg.run.master_weights == "bf16" and cfg.training.optim.value == "adamw_torch_8bit"
    cfg = parse_train_args(train_argv(tmp_path, master_weights="bf16", optim="adamw_torch_4bit"))
    assert cfg.training.optim.value == "adamw_torch_4bit"
    with pytest.raises(UserError, match=r"--master_weights must be fp32 or bf16, got 'fp16'"):
        parse_train_args(train_argv(tmp_path, master_weights="fp16"))
    with pytest.raises(UserError, match=r"--master_weights bf16 needs an optimizer .* stochastic rounding: --optim "
                                        r"adamw_torch_8bit or adamw_torch_4bit \(got --optim adamw_torch\)"):
        parse_train_args(train_argv(tmp_path, master_weights="bf16", optim="adamw_torch"))
    with pytest.raises(UserError, match="bf16_stochastic_round=False would lose the updates"):
        parse_train_args(train_argv(tmp_path, master_weights="bf16", optim_args="bf16_stochastic_round=False"))
    with pytest.raises(UserError, match="--loss_chunk_size must be auto, 0 or a positive number"):
        parse_train_args(train_argv(tmp_path, loss_chunk_size="big"))


# --- a lean run of the CLI's code path: resume exact, outputs load ------------------------------------


@pytest.mark.slow  # three short runs, each compiling torchao's optimizer step (~1 min alone, minutes on a busy machine)
def test_lean_run_resumes_exactly_and_its_model_loads(tmp_path):
    argv = lambda out: train_argv(out, steps=4, save_steps=2, master_weights="bf16")  # noqa: E731
    straight = run_training(parse_train_args(argv(tmp_path / "straight")))
    run_training(parse_train_args(argv(tmp_path / "resumed")), callbacks=[stop_at(2)])  # "killed" after checkpoint-2
    assert not (tmp_path / "resumed" / "checkpoint-4").exists()
    run_training(parse_train_args(argv(tmp_path / "resumed")))  # the same command continues from checkpoint-2

    def losses(run):
        state = json.loads((tmp_path / run / "trainer_state.json").read_text())
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    assert [s for s, _ in losses("resumed")] == [1, 2, 3, 4]
    assert losses("resumed") == losses("straight")
    assert losses("straight")[-1][1] < losses("straight")[0][1]  # it trains
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert a["model.layers.0.self_attn.q_proj.weight_clip_val"].dtype == torch.float32
    # the lean updates moved the bf16 weights (LR 1e-3) and the scales
    init = load_file(FIXTURE / "model.safetensors")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"].bfloat16())
    opt = torch.load(tmp_path / "straight" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert any(type(v).__name__ == "OptimState8bit" for s in opt["state"].values() for v in s.values())
    saved = (tmp_path / "straight" / "paretoq_config.yaml").read_text()
    assert "master_weights: bf16" in saved and "optim: adamw_torch_8bit" in saved
    # the final model loads as any paretoq model (weights exact; fp32 in memory as config.json says)
    reloaded = AutoModelForCausalLM.from_pretrained(straight["final_model_dir"])
    q = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear)
    assert torch.equal(q.weight.detach().bfloat16(), a["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(q.weight_clip_val.detach(), a["model.layers.0.self_attn.q_proj.weight_clip_val"])
