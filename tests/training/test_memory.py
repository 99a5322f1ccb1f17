"""Nothing large that FP training would not hold: the chunked causal-LM loss (same loss and gradients,
never the whole sequence's logits), gradient checkpointing with the quantizer and its cache (same
gradients), no second copy of a weight held by a layer; and tokens/s + peak memory in the training log."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from conftest import FIXTURE, tiny_llama, train_argv
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.training import chunked_loss
from paretoq.training.args import parse_train_args
from paretoq.training.lean import to_lean
from paretoq.training.run import run_training
from paretoq.training.trainer import QATTrainer


def _fixture():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(FIXTURE).train()


def _labels(ids):
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 20:] = -100
    return labels


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("make", [_fixture, lambda: tiny_llama(layers=2, hidden=64, vocab=128).train()],
                         ids=["minicpm_tied_scaled_head", "llama"])
@pytest.mark.parametrize("num_items", [None, 50])
def test_chunked_loss_equals_the_models_loss_and_gradients(make, num_items):
    model = make()
    quantize_model(model, QuantConfig(w_bits=2))
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = _labels(ids)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    plain = model(input_ids=ids, labels=labels, **kwargs).loss
    plain.backward()
    want = _grads(model)
    hidden, head = chunked_loss.hidden_states_and_head(model, {"input_ids": ids, "labels": labels})
    got_loss = chunked_loss.chunked_causal_lm_loss(hidden, head, labels, kwargs.get("num_items_in_batch"), chunk=7)
    got_loss.backward()
    got = _grads(model)
    torch.testing.assert_close(got_loss, plain, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys() and any(k.endswith("weight_clip_val") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=k)
    assert model.get_output_embeddings() is head  # the capture module was swapped back
    # control: labels not shifted by one give another loss
    wrong = chunked_loss.chunked_causal_lm_loss(hidden.detach(), head, torch.roll(labels, 1, dims=1), chunk=7)
    assert abs(wrong.item() - plain.item()) > 1e-3


def _saved_bytes(fn, exclude=()) -> tuple[int, int]:
    """(largest numel, total bytes) of the tensors autograd saves for backward while ``fn`` runs, leaving
    out tensors that share storage with ``exclude`` (the parameters: no new memory)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            sizes.append((t.numel(), t.numel() * t.element_size(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    unique = {ptr: b for _, b, ptr in sizes}
    return max((n for n, _, _ in sizes), default=0), sum(unique.values())


def test_chunked_loss_never_holds_the_whole_logits():
    model = tiny_llama(layers=1, hidden=64, vocab=1024).train()
    ids = torch.randint(3, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    logits_numel = ids.numel() * 1024

    def chunked():
        hidden, head = chunked_loss.hidden_states_and_head(model, {"input_ids": ids})
        chunked_loss.chunked_causal_lm_loss(hidden, head, ids, chunk=16).backward()

    largest_plain, _ = _saved_bytes(lambda: model(input_ids=ids, labels=ids).loss.backward(), model.parameters())
    largest_chunked, _ = _saved_bytes(chunked, model.parameters())
    assert largest_plain >= logits_numel  # control: the plain loss keeps the logits for backward
    assert largest_chunked <= 16 * 1024  # one chunk's logits at most (recomputed in backward)


def test_trainer_chunks_the_loss_where_logits_are_large(tmp_path):
    model = tiny_llama(layers=1, hidden=32, vocab=64)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = QATTrainer(model=model, args=args)
    small = {"labels": torch.zeros(2, 32, dtype=torch.long)}
    assert trainer._chunk_size(model, small) == 0
    trainer.CHUNKED_LOSS_ABOVE = 2 * 32 * 64 * 4 - 1  # one micro-batch's fp32 logits: just above the threshold
    assert trainer._chunk_size(model, small) == chunked_loss.DEFAULT_CHUNK
    trainer.loss_chunk_size = 0
    assert trainer._chunk_size(model, small) == 0
    model.config.final_logit_softcapping = 30.0  # logits transformed after the head: never chunked
    trainer.loss_chunk_size = 8
    assert trainer._chunk_size(model, small) == 0


def test_evaluation_loss_in_chunks_equals_the_plain_one(tmp_path):
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(4))]
    losses = {}
    for chunk in (0, 5):
        model = tiny_llama(layers=2, hidden=64, vocab=128, seed=1)
        quantize_model(model, QuantConfig(w_bits=2))
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
        trainer = QATTrainer(model=model, args=args, eval_dataset=data, data_collator=default_data_collator,
                             loss_chunk_size=chunk)
        losses[chunk] = trainer.evaluate()["eval_loss"]
    assert losses[5] == pytest.approx(losses[0], rel=1e-6) and losses[0] > 1.0


class _GradsBeforeStep(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step(tmp_path, *, checkpointing=False, lean=False, chunk=0, cache=True):
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))]
    model = tiny_llama(layers=2, hidden=64, vocab=128, seed=1).train()
    quantize_model(model, QuantConfig(w_bits=2))
    if lean:
        to_lean(model)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    cap = _GradsBeforeStep()
    args = TrainingArguments(output_dir=str(tmp_path / f"{checkpointing}{lean}{chunk}{cache}"),
                             per_device_train_batch_size=2, max_steps=1, gradient_checkpointing=checkpointing,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                             dataloader_num_workers=0, optim="adamw_torch")  # grads are taken before the step
    trainer = QATTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                         callbacks=[cap], loss_chunk_size=chunk, fake_quant_cache=cache)
    trainer.train()
    return cap.grads, len(calls), trainer, model


@pytest.mark.parametrize("chunk", [0, 10])
def test_gradient_checkpointing_with_the_quantizer_and_its_cache_gives_the_same_gradients(tmp_path, chunk):
    plain, calls_plain, trainer, _ = _one_step(tmp_path, chunk=chunk)
    assert not trainer.fake_quant_cache
    ckpt, calls_ckpt, trainer, model = _one_step(tmp_path, checkpointing=True, chunk=chunk)
    assert trainer.fake_quant_cache  # fp32 master: the cache serves the recomputation
    assert (calls_plain, calls_ckpt) == (1, 2)  # the layer ran again inside backward
    assert ckpt.keys() == plain.keys() and sum(k.endswith("weight_clip_val") for k in ckpt) == 14
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-8, msg=k)
    # after the step no layer holds Ŵ or a gradient sum: nothing of weight size carried across steps
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m._cache_weight is None and m._cache_grad is None for m in layers)


def test_gradient_checkpointing_in_lean_mode_gives_the_same_gradients(tmp_path):
    plain, _, _, _ = _one_step(tmp_path, lean=True, chunk=10)
    ckpt, calls, trainer, _ = _one_step(tmp_path, lean=True, chunk=10, checkpointing=True)
    assert not trainer.fake_quant_cache and calls == 2
    for k in plain:
        assert plain[k].dtype == (torch.float32 if k.endswith("weight_clip_val") else torch.bfloat16)
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=0, msg=k)  # the same bf16 products, recomputed


def test_lean_layers_keep_no_second_copy_of_their_weights():
    """Measured on what autograd keeps for backward: a lean QAT model keeps exactly the activation bytes the
    same model keeps unquantized (Ŵ is recomputed in backward from W and α); the control — the fake-quant
    cache on — keeps one Ŵ per quantized layer more."""
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def model_for(quant: bool, cache: bool = False):
        model = tiny_llama(layers=2, hidden=64, vocab=128, seed=1).train()
        if quant:
            quantize_model(model, QuantConfig(w_bits=2))
        to_lean(model)
        if cache:
            from paretoq.quant.linear import set_fake_quant_cache

            set_fake_quant_cache(model, True)
        return model

    def measure(model):
        return _saved_bytes(lambda: model(input_ids=ids, labels=ids).loss.backward(), model.parameters())[1]

    fp, qat = measure(model_for(False)), measure(model_for(True))
    cached_model = model_for(True, cache=True)
    cached = measure(cached_model)
    w_hat = sum(m.weight.numel() * 2 for m in cached_model.modules() if isinstance(m, QuantLinear))
    assert qat == fp
    assert cached == fp + w_hat


# --- tokens/s and peak memory in the log ---------------------------------------------------------------


class _LogTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            import time

            self.times.append((time.perf_counter(), dict(logs)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_training_log_has_tokens_per_second_and_peak_memory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cap = _LogTimes()
    out = tmp_path / "run"
    run_training(parse_train_args(train_argv(out, steps=4, save_strategy="no", logging_steps=2, report_to="tensorboard",
                                             compile_quantizer="false")), callbacks=[cap])
    assert len(cap.times) == 2
    (t1, first), (t2, second) = cap.times
    for logs in (first, second):
        assert logs["tokens_per_second"] > 0
        assert _rss_bytes() * 0.5 < logs["peak_memory_gb"] * 1e9 < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # the second line covers steps 3-4: 2 steps × 2 blocks × 32 tokens in about the time between the lines
    assert 128 / (t2 - t1) / 3 < second["tokens_per_second"] < 128 / (t2 - t1) * 3
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/tokens_per_second", "train/peak_memory_gb"} <= set(events.Tags()["scalars"])
