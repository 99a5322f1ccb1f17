"""Recipe controls (``paretoq.training.recipe`` / ``distill``): FP phase then QAT, re-warm-up, WSD, KD."""

from __future__ import annotations

import json
import math
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from conftest import FIXTURE, tiny_llama, train_argv
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.errors import UserError
from paretoq.training.args import parse_train_args
from paretoq.training.distill import make_teacher
from paretoq.training.recipe import two_phase_lambda
from paretoq.training.run import run_training
from paretoq.training.trainer import QATTrainer

FIXTURE_LAYERS = 3 * 7  # minicpm4-tiny: 3 decoder layers × 7 projections


NO_SAVE = dict(save_strategy="no")  # most runs here need no checkpoint


class _Watch(TrainerCallback):
    """Per optimizer step: QuantLinear count, scale-group contents and LRs, gradients."""

    def __init__(self):
        self.quantized, self.scale_groups, self.lrs, self.grads, self.model = [], [], [], [], None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self.quantized.append(sum(isinstance(m, QuantLinear) for m in model.modules()))
        group = next(g for g in optimizer.param_groups if g.get("paretoq_scales"))
        self.scale_groups.append((len(group["params"]), group["lr"]))
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def on_train_end(self, args, state, control, model=None, **kw):
        self.model = model


def _losses(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def _lrs(out):
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]


# --- FP phase, then QAT -------------------------------------------------------------------------


def test_qat_start_fraction_switches_at_the_right_step(tmp_path):
    watch = _Watch()
    argv = train_argv(tmp_path / "run", qat_start_fraction=0.5, scale_lr_multiplier=10, lr_scheduler_type="constant",
                      **NO_SAVE)
    metrics = run_training(parse_train_args(argv), callbacks=[watch])
    assert watch.quantized == [0, 0, FIXTURE_LAYERS, FIXTURE_LAYERS]  # steps 1–2 FP, 3–4 QAT
    assert [n for n, _ in watch.scale_groups] == [0, 0, FIXTURE_LAYERS, FIXTURE_LAYERS]
    assert all(lr == pytest.approx(1e-2) for _, lr in watch.scale_groups)  # LR × multiplier
    assert not any(k.endswith("weight_clip_val") for k in watch.grads[1])
    assert sum(k.endswith("weight_clip_val") for k in watch.grads[2]) == FIXTURE_LAYERS
    assert metrics["quantized_layers"] == FIXTURE_LAYERS
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert saved["model.layers.0.self_attn.q_proj.weight_clip_val"].shape == (128, 1)
    # the scales started from the weights at the switch and then trained for 2 steps
    model = watch.model
    q = model.model.layers[0].self_attn.q_proj
    ref = q.weight.detach().abs().amax(-1, keepdim=True)
    assert not torch.allclose(q.weight_clip_val.detach(), ref)


def test_schedule_restarts_with_a_fresh_warmup_at_the_qat_start(tmp_path):
    out = tmp_path / "run"
    run_training(parse_train_args(train_argv(out, bits=3, steps=6, qat_start_fraction=0.5, lr_scheduler_type="linear",
                                             warmup_steps=1, **NO_SAVE)))
    # phase 1 (3 steps): warm-up 1 then linear decay; phase 2 the same again (LR logged before each step)
    assert _lrs(out) == pytest.approx([0.0, 1e-3, 5e-4, 0.0, 1e-3, 5e-4])
    # without an FP phase: exactly transformers' schedule
    out2 = tmp_path / "plain"
    run_training(parse_train_args(train_argv(out2, bits=3, steps=6, lr_scheduler_type="linear", warmup_steps=1,
                                             **NO_SAVE)))
    assert _lrs(out2) == pytest.approx([0.0, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])


def test_warmup_fraction_applies_per_phase():
    args = TrainingArguments(output_dir="/tmp/unused", lr_scheduler_type="cosine", warmup_steps=0.25,
                             report_to="none")
    lam = two_phase_lambda(args, total_steps=16, switch_step=8)
    assert [lam(k) for k in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])  # ceil(0.25·8) = 2 warm-up steps
    assert [lam(k) for k in (8, 9, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert lam(7) < 0.1 and lam(15) < 0.1  # each phase decays to ~0


def test_wsd_schedule_runs_through_our_args(tmp_path):
    out = tmp_path / "wsd"
    run_training(parse_train_args(train_argv(out, bits=4, steps=6, warmup_steps=2,
                                             lr_scheduler_type="warmup_stable_decay",
                                             lr_scheduler_kwargs='{"num_decay_steps": 2, "decay_type": "linear"}',
                                             **NO_SAVE)))
    assert _lrs(out) == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3, 5e-4])
    # no num_decay_steps: 20% of each phase decays (here round(0.2·5) = 1 step per phase)
    out2 = tmp_path / "wsd2"
    run_training(parse_train_args(train_argv(out2, bits=4, steps=10, warmup_steps=1, qat_start_fraction=0.5,
                                             lr_scheduler_type="warmup_stable_decay", **NO_SAVE)))
    lrs = _lrs(out2)
    assert lrs[:5] == pytest.approx([0.0, 1e-3, 1e-3, 1e-3, 1e-3]) and lrs[5:] == pytest.approx(lrs[:5])


def test_resume_across_the_qat_start_gives_identical_losses_and_weights(tmp_path):
    def argv(out):
        return train_argv(out, steps=6, qat_start_fraction=0.5, save_steps=2)

    run_training(parse_train_args(argv(tmp_path / "straight")))  # QAT starts after step 3

    class StopAt(TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= self.step:
                control.should_training_stop = True

    for stop in (2, 4):  # killed after an FP checkpoint / after a quantized one
        out = tmp_path / f"stop{stop}"
        run_training(parse_train_args(argv(out)), callbacks=[StopAt(stop)])
        ckpt = json.loads((out / f"checkpoint-{stop}" / "config.json").read_text())
        assert ("quantization_config" in ckpt) == (stop > 3)
        run_training(parse_train_args(argv(out)))  # the same command continues
        assert _losses(out) == _losses(tmp_path / "straight")
        a = load_file(tmp_path / "straight" / "model.safetensors")
        b = load_file(out / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp_checkpoint_resumed_without_an_fp_phase_is_refused(tmp_path):
    out = tmp_path / "run"
    run_training(parse_train_args(train_argv(out, qat_start_fraction=0.5, save_steps=1)))
    import shutil

    for name in ("checkpoint-3", "checkpoint-4"):
        shutil.rmtree(out / name, ignore_errors=True)
    with pytest.raises(UserError, match="w_bits=16"):
        run_training(parse_train_args(train_argv(out, save_steps=1)))


# --- flags --------------------------------------------------------------------------------------


def test_scale_init_and_calibration_flags(tmp_path):
    cfg = parse_train_args(train_argv(tmp_path / "a", scale_init="mse_act"))
    assert cfg.quant.scale_init == "mse_act" and cfg.model.calibration_samples == 16
    assert parse_train_args(train_argv(tmp_path / "b")).model.calibration_samples is None
    for bad, match in ((["--calibration_samples", "0"], "--calibration_samples"),
                       (["--scale_init", "best"], "scale_init 'best' is unknown"),
                       (["--qat_start_fraction", "1"], "--qat_start_fraction"),
                       (["--kd_weight", "1.5"], "--kd_weight"),
                       (["--kd_teacher_dtype", "fp8"], "--kd_teacher_dtype"),
                       (["--scale_learning_rate", "-1"], "--scale_learning_rate")):
        with pytest.raises(UserError, match=match):
            parse_train_args(train_argv(tmp_path / "c", *bad))
    with pytest.raises(UserError, match="needs a quantizing --w_bits"):
        parse_train_args(train_argv(tmp_path / "d", bits=16, qat_start_fraction=0.5))


def test_mse_act_run_and_absolute_scale_lr(tmp_path):
    watch = _Watch()
    out = tmp_path / "run"
    run_training(parse_train_args(train_argv(out, steps=1, scale_init="mse_act", calibration_samples=4,
                                             scale_learning_rate=3e-3, lr_scheduler_type="constant", **NO_SAVE)),
                 callbacks=[watch])
    assert watch.scale_groups == [(FIXTURE_LAYERS, pytest.approx(3e-3))]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["scale_init"] == "mse_act"
    # the run's initial scales are the search result, not the closed form
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(FIXTURE)
    quantize_model(ref, QuantConfig(w_bits=2))
    trained = watch.model.model.layers[1].mlp.down_proj.weight_clip_val.detach()
    assert not torch.allclose(trained, ref.model.layers[1].mlp.down_proj.weight_clip_val, rtol=0.01)


# --- knowledge distillation ---------------------------------------------------------------------


def _kd_setup(tmp_path, kd_weight, temperature=2.0):
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=32, vocab=64)
    teacher = make_teacher(model)
    quantize_model(model, QuantConfig(w_bits=2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = QATTrainer(model=model, args=args, teacher=teacher, kd_weight=kd_weight, kd_temperature=temperature)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 5:8] = -100  # ignored positions must not count
    return trainer, model, teacher, {"input_ids": ids, "labels": labels}


def test_kd_loss_equals_a_hand_computation(tmp_path):
    w, temp = 0.7, 2.0
    trainer, model, teacher, inputs = _kd_setup(tmp_path, w, temp)
    model.train()
    n_items = 25  # as if the accumulated batch held 25 counted tokens
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(n_items))
    with torch.no_grad():
        s_logits = model(input_ids=inputs["input_ids"]).logits
        t_logits = teacher(input_ids=inputs["input_ids"]).logits
    ce_sum, kl_sum = 0.0, 0.0
    for b in range(2):
        for t in range(11):
            y = inputs["labels"][b, t + 1].item()
            if y == -100:
                continue
            ce_sum += -torch.log_softmax(s_logits[b, t].double(), -1)[y].item()
            p_t = torch.softmax(t_logits[b, t].double() / temp, -1)
            p_s = torch.softmax(s_logits[b, t].double() / temp, -1)
            kl_sum += (p_t * (p_t.log() - p_s.log())).sum().item()
    expected = (1 - w) * ce_sum / n_items + w * temp**2 * kl_sum / n_items
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # without num_items_in_batch: means over this micro-batch's 19 counted tokens
    loss = trainer.compute_loss(model, dict(inputs))
    assert loss.item() == pytest.approx((1 - w) * ce_sum / 19 + w * temp**2 * kl_sum / 19, rel=1e-5)
    # evaluation reports plain CE
    model.eval()
    assert trainer.compute_loss(model, dict(inputs)).item() == pytest.approx(ce_sum / 19, rel=1e-5)


def test_kd_weight_zero_is_plain_ce(tmp_path):
    trainer, model, _, inputs = _kd_setup(tmp_path, 0.0)
    assert trainer.teacher is None
    plain = QATTrainer(model=model, args=trainer.args)
    model.train()
    for n in (None, torch.tensor(30)):
        a = trainer.compute_loss(model, dict(inputs), num_items_in_batch=n)
        b = plain.compute_loss(model, dict(inputs), num_items_in_batch=n)
        assert torch.equal(a, b)


def test_kd_gradient_accumulation_is_exact(tmp_path):
    grads = []
    for bs, ga in ((4, 1), (1, 4)):
        watch = _Watch()
        cfg = parse_train_args(train_argv(tmp_path / f"bs{bs}", bits=3, steps=1, per_device_train_batch_size=bs,
                                          gradient_accumulation_steps=ga, kd_weight=0.5, kd_temperature=2,
                                          **NO_SAVE))
        run_training(cfg, callbacks=[watch])
        grads.append(watch.grads[0])
    a, b = grads
    assert a.keys() == b.keys() and any(k.endswith("weight_clip_val") for k in a)
    for k in a:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert ((a[k] - b[k]).abs().max() / scale) < 1e-5, k


def test_kd_pulls_the_student_towards_the_teacher(tmp_path):
    """Full KD (w = 1) from the FP model lowers KL(teacher‖student) over a few steps."""
    trainer, model, teacher, inputs = _kd_setup(tmp_path, 1.0, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)  # W, α and the rest (3e-3 overshoots at 2 bits)
    model.train()
    kls = []
    for _ in range(8):
        loss = trainer.compute_loss(model, dict(inputs))
        kls.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kls[-1] < 0.5 * kls[0]


def test_resume_with_another_qat_start_is_refused_clearly(tmp_path):
    out = tmp_path / "run"
    argv = train_argv(out, qat_start_fraction=0.25)

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 2:
                control.should_training_stop = True

    run_training(parse_train_args(argv), callbacks=[StopAt2()])  # checkpoint-2 is quantized (switch after 1)
    with pytest.raises(UserError, match="quantized at step 2, before this run's QAT start"):
        run_training(parse_train_args(train_argv(out, qat_start_fraction=0.75)))


def test_gptq_init_at_a_mid_run_switch_under_bf16_autocast(tmp_path):
    """At the switch the forward runs under the Trainer's bf16 autocast; the calibration must cope."""
    watch = _Watch()
    out = tmp_path / "run"
    run_training(parse_train_args(train_argv(out, bits=3, qat_start_fraction=0.5, scale_init="gptq",
                                             calibration_samples=4, bf16="true", **NO_SAVE)), callbacks=[watch])
    assert watch.quantized == [0, 0, FIXTURE_LAYERS, FIXTURE_LAYERS]
    assert all(math.isfinite(loss) for _, loss in _losses(out))


class _QuantizerWatch(TrainerCallback):
    """Per step: the kernels of the model's QuantLinear layers, and how their calls went."""

    def __init__(self):
        self.kernels, self.calls = [], []

    def on_step_end(self, args, state, control, model=None, **kw):
        kernels = {m.kernels for m in model.modules() if isinstance(m, QuantLinear)}
        self.kernels.append([type(k).__name__ for k in kernels])
        self.calls.append(dict(next(iter(kernels)).calls) if len(kernels) == 1 and None not in kernels else None)


def test_cpu_training_fuses_the_quantizer_by_default(tmp_path, monkeypatch, caplog):
    """--compile_quantizer auto (no flag, no $PARETOQ_COMPILE_QUANTIZER): a CPU run trains with the
    fused kernels built ahead of time (every quantizer call ran one), says so in its log, and leaves
    nothing behind: the choice is the run's model's."""
    import logging

    monkeypatch.delenv("PARETOQ_COMPILE_QUANTIZER", raising=False)
    watch = _QuantizerWatch()
    with caplog.at_level(logging.INFO, logger="paretoq.training.run"):
        run_training(parse_train_args(train_argv(tmp_path / "run", bits=4, steps=2, **NO_SAVE)), callbacks=[watch])
    assert watch.kernels == [["FusedKernels"], ["FusedKernels"]]
    first, second = watch.calls
    assert first["prebuilt"] > 0 and second["prebuilt"] == 2 * first["prebuilt"]
    assert first["eager"] == second["eager"] == 0
    assert "quantizer: fused kernels" in caplog.messages
    model = tiny_llama()
    quantize_model(model, QuantConfig(w_bits=4))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kernels is None for m in layers)  # a model quantized after the run: eager, the default


def test_layers_quantized_at_a_mid_run_qat_start_get_the_fused_kernels(tmp_path):
    watch = _QuantizerWatch()
    run_training(parse_train_args(train_argv(tmp_path / "run", steps=2, qat_start_fraction=0.5, compile_quantizer="true",
                                             **NO_SAVE)), callbacks=[watch])
    assert watch.kernels == [[], ["FusedKernels"]]  # step 1 full precision, step 2 quantized
    assert watch.calls[1]["prebuilt"] > 0 and watch.calls[1]["eager"] == 0


def test_compile_quantizer_trains_like_the_eager_quantizer(tmp_path):
    """--compile_quantizer: same Ŵ and ∂W bits, ∂α to summation order, so 4 steps track the eager
    run closely."""
    eager, fused = tmp_path / "eager", tmp_path / "fused"
    watch = _QuantizerWatch()
    run_training(parse_train_args(train_argv(eager, **NO_SAVE)))
    run_training(parse_train_args(train_argv(fused, compile_quantizer="true", **NO_SAVE)), callbacks=[watch])
    assert watch.calls[-1]["prebuilt"] > 0 and watch.calls[-1]["eager"] == 0
    a, b = _losses(eager), _losses(fused)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    assert [l for _, l in a] == pytest.approx([l for _, l in b], abs=1e-4)
    wa, wb = load_file(eager / "model.safetensors"), load_file(fused / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-4, msg=k)
