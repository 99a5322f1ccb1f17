"""The fake-quant cache: Ŵ once per optimizer step, gradients pushed through the quantizer once.

Exactness against the uncached path: ∂L/∂W bit for bit, ∂L/∂α to fp32 summation order (bit for
bit with one micro-batch); invalidation when the weight or the scale changes; the same gradients
through ``QATTrainer`` (flushed before clipping). Also: the quantizer's CPU row blocks change no bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments, default_data_collator

import paretoq.quant.linear as linear_mod
from conftest import tiny_llama
from paretoq.quant import QuantConfig, QuantLinear, quantize_model
from paretoq.quant.functional import fake_quantize
from paretoq.quant.linear import flush_fake_quant_grads, set_fake_quant_cache
from paretoq.training.trainer import QATTrainer

BITS = [1, 1.58, 2, 3, 4]


def _layer(bits, group=None, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(64, 48), QuantConfig(w_bits=bits, group_size=group)).train()


def _grads(layer, xs, gs, cache, autocast=False):
    """Accumulate over micro-batches (x_i, upstream grad g_i); returns (W.grad, α.grad, bias.grad)."""
    layer = copy.deepcopy(layer)
    set_fake_quant_cache(layer, cache)
    for x, g in zip(xs, gs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(g.to(y.dtype))
    flush_fake_quant_grads(layer)
    return layer.weight.grad, layer.weight_clip_val.grad, layer.bias.grad


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_cached_gradients_equal_uncached(bits, group, autocast, micro_batches):
    layer = _layer(bits, group)
    torch.manual_seed(1)
    xs = [torch.randn(3, 5, 64) for _ in range(micro_batches)]
    gs = [torch.randn(3, 5, 48) for _ in range(micro_batches)]
    ref = _grads(layer, xs, gs, cache=False, autocast=autocast)
    got = _grads(layer, xs, gs, cache=True, autocast=autocast)
    assert torch.equal(got[0], ref[0])  # M ⊙ Σ g_i = Σ M ⊙ g_i exactly
    assert torch.equal(got[2], ref[2])
    if micro_batches == 1:
        assert torch.equal(got[1], ref[1])
    else:  # Σ_row c ⊙ Σ_i g_i vs Σ_i Σ_row c ⊙ g_i: fp32 summation order only
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)


def _count_quantize(monkeypatch):
    calls = []
    real = linear_mod.quantize_weight

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "quantize_weight", counting)
    return calls


def test_quantized_once_per_optimizer_step(monkeypatch):
    calls = _count_quantize(monkeypatch)
    layer = _layer(2)
    set_fake_quant_cache(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(2):
        for _ in range(4):  # gradient accumulation: one Ŵ for the four micro-batches
            layer(torch.randn(2, 64)).square().sum().backward()
        assert layer.weight.grad is None  # pending until the flush
        flush_fake_quant_grads(layer)
        assert layer.weight.grad is not None and layer.weight_clip_val.grad is not None
        opt.step()
        opt.zero_grad()
        assert len(calls) == step + 1


@pytest.mark.parametrize("change", ["weight", "scale", "load_state_dict"])
def test_cache_invalidated_when_weight_or_scale_changes(change):
    layer = _layer(4)
    set_fake_quant_cache(layer)
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = layer(x)
        if change == "weight":
            layer.weight.mul_(1.5)
        elif change == "scale":
            layer.weight_clip_val.mul_(0.5)
        else:
            sd = {k: v * 0.5 if k == "weight" else v for k, v in layer.state_dict().items()}
            layer.load_state_dict(sd)
        after = layer(x)
        fresh = nn.functional.linear(x, fake_quantize(layer.weight, layer.weight_clip_val, layer.scheme), layer.bias)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


def test_change_with_pending_gradients_raises():
    layer = _layer(3)
    set_fake_quant_cache(layer)
    layer(torch.randn(2, 64)).sum().backward()
    with torch.no_grad():
        layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="flush_fake_quant_grads"):
        layer(torch.randn(2, 64))


def test_eval_mode_and_disabled_cache_do_not_cache(monkeypatch):
    calls = _count_quantize(monkeypatch)
    layer = _layer(2)
    set_fake_quant_cache(layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
        layer(torch.randn(2, 64))
    assert calls == [] and layer._cache_weight is None
    layer.train()
    set_fake_quant_cache(layer, False)
    layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    # uncached fp32: Ŵ made in forward and made again in backward for ∂L/∂x (not kept), no cache built
    assert calls == [1, 1] and layer._cache_weight is None and layer.weight.grad is not None


def test_disabling_flushes_pending_gradients():
    layer = _layer(2)
    set_fake_quant_cache(layer)
    layer(torch.randn(2, 64)).sum().backward()
    set_fake_quant_cache(layer, False)
    assert layer.weight.grad is not None and layer._cache_grad is None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_pending_gradient_is_held_not_copied_and_never_written(monkeypatch, autocast, micro_batches):
    """One micro-batch: autograd's ∂L/∂Ŵ (bf16 under autocast) is held as it is and read once by the
    flush, never written (the eager backward may write in place only into a buffer of its own);
    a second micro-batch starts an fp32 sum of our own."""
    layer = _layer(2)
    set_fake_quant_cache(layer)
    handed = []
    add_grad = layer._add_grad
    monkeypatch.setattr(layer, "_add_grad", lambda g: (handed.append((g, g.clone())), add_grad(g)))
    for _ in range(micro_batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(torch.randn(3, 64))
        y.sum().backward()
    held = layer._cache_grad
    if micro_batches == 1:
        assert held is handed[0][0] and held.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert not layer._cache_grad_owned
    else:
        assert all(held is not g for g, _ in handed) and held.dtype == torch.float32 and layer._cache_grad_owned
    flush_fake_quant_grads(layer)
    for g, before in handed:
        assert torch.equal(g, before)
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.data_ptr() != handed[0][0].data_ptr()


def _model_grads(cache, checkpointing, steps_of_micro_batches):
    model = tiny_llama(layers=2, hidden=64, vocab=128, seed=3).train()
    quantize_model(model, QuantConfig(w_bits=2, group_size=32))
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    set_fake_quant_cache(model, cache)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps_of_micro_batches):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        (model(input_ids=ids, labels=ids).loss / steps_of_micro_batches).backward()
    flush_fake_quant_grads(model)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_gradient_accumulation_and_checkpointing(monkeypatch, checkpointing):
    ref = _model_grads(cache=False, checkpointing=checkpointing, steps_of_micro_batches=3)
    calls = _count_quantize(monkeypatch)
    got = _model_grads(cache=True, checkpointing=checkpointing, steps_of_micro_batches=3)
    assert len(calls) == 2 * 7  # each of the 14 layers quantized once, not once per (re)computed forward
    assert got.keys() == ref.keys() and any(k.endswith("weight_clip_val") for k in got)
    for k in ref:
        if k.endswith("weight_clip_val"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-8)
        else:
            assert torch.equal(got[k], ref[k]), k


# -- the quantizer's CPU row blocks do not change a bit --------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 8])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_row_blocks_do_not_change_results(monkeypatch, bits, group, grad_dtype):
    from paretoq.quant import functional
    from paretoq.quant.functional import SCHEMES, init_scale, quantize_backward, quantize_weight

    torch.manual_seed(4)
    W = torch.randn(37, 96) * 0.05
    A = init_scale(W, SCHEMES[bits], group) * torch.empty(37, 1).uniform_(0.5, 1.5)
    G = torch.randn(37, 96).to(grad_dtype)
    whole = quantize_weight(W, A, SCHEMES[bits], grad_dtype), *quantize_backward(W, A, SCHEMES[bits], G)
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 200)  # blocks of 2 rows, and a ragged last one
    blocked = quantize_weight(W, A, SCHEMES[bits], grad_dtype), *quantize_backward(W, A, SCHEMES[bits], G)
    for x, y in zip(whole, blocked):
        assert torch.equal(x, y)


# -- QATTrainer: cache on (default, single process) vs off ---------------------------------------
class _GradsBeforeStep(TrainerCallback):
    grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bits", [1.58, 4])
def test_trainer_cache_gives_the_uncached_gradients(tmp_path, bits):
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (4, 16), generator=gen)]
    grads = {}
    for cache in (False, True):
        model = tiny_llama(layers=2, hidden=64, vocab=128, seed=1).train()
        quantize_model(model, QuantConfig(w_bits=bits))
        cap = _GradsBeforeStep()
        args = TrainingArguments(output_dir=str(tmp_path / str(cache)), per_device_train_batch_size=1,
                                 gradient_accumulation_steps=4, max_steps=1, max_grad_norm=0.05, report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
        trainer = QATTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                             callbacks=[cap], fake_quant_cache=cache)
        assert trainer.fake_quant_cache is cache
        trainer.train()
        grads[cache] = cap.grads
    ref, got = grads[False], grads[True]
    assert got.keys() == ref.keys() and sum(k.endswith("weight_clip_val") for k in got) == 14
    for k in ref:  # clipped to the same norm: the flush ran before gradient clipping
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("ga,checkpointing,expected", [(1, False, False), (2, False, True), (1, True, True)])
def test_trainer_caches_only_where_it_saves_work(tmp_path, ga, checkpointing, expected):
    model = tiny_llama(layers=1, hidden=32, vocab=64, seed=1).train()
    quantize_model(model, QuantConfig(w_bits=2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=ga,
                             gradient_checkpointing=checkpointing, max_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True)
    trainer = QATTrainer(model=model, args=args, train_dataset=[], data_collator=default_data_collator)
    assert trainer.fake_quant_cache is expected
    assert {m.cache_quantized_weight for m in model.modules() if isinstance(m, QuantLinear)} == {expected}
