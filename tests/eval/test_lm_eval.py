"""`paretoq eval --tasks`: lm-eval on a model whose right answers are known (a bigram model that forces each
item's gold continuation), on a packed model (its packed layers must run), and on the tiny MiniCPM4 fixture with
the shipped offline task."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch
import yaml

from conftest import FIXTURE
from paretoq.cli import main as cli

pytest.importorskip("lm_eval")  # a third-party extra (paretoq[eval]); paretoq's own modules are imported above

LIMIT = 6
FORCED_ITEMS = 8  # kjv_cloze's first 8 items


def _items(n):
    from paretoq.eval.harness import LOCAL_TASKS_DIR

    lines = (LOCAL_TASKS_DIR / "kjv_cloze" / "kjv_cloze.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def reference_accuracy(model, tokenizer, items, max_length):
    """lm-eval's multiple-choice scoring, written out: for each choice, the summed log-probability
    of the tokens of " choice" after the context (the pair encoded whole and split at the
    context's length; the input left-truncated to max_length tokens); acc = argmax == label,
    acc_norm = argmax of the score per character of the choice."""
    acc, acc_norm = 0, 0
    for item in items:
        ctx_enc = tokenizer.encode(item["context"])
        scores = []
        for choice in item["choices"]:
            cont = tokenizer.encode(item["context"] + " " + choice)[len(ctx_enc):]
            inp = torch.tensor((ctx_enc + cont)[-(max_length + 1):][:-1])[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(inp).logits[0, -len(cont):].float(), -1)
            scores.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        acc += max(range(4), key=lambda i: scores[i]) == item["label"]
        norm = [s / len(c) for s, c in zip(scores, item["choices"])]  # lm-eval: by the characters of the choice
        acc_norm += max(range(4), key=lambda i: norm[i]) == item["label"]
    return acc / len(items), acc_norm / len(items)


# --- a model whose right answers are known ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def forced_task(tmp_path_factory):
    """An lm-eval task folder (``--include_path``): the task ``forced``, kjv_cloze's first items, read offline."""
    from paretoq.eval.harness import LOCAL_TASKS_DIR

    folder = tmp_path_factory.mktemp("tasks") / "forced"
    folder.mkdir()
    (folder / "forced.jsonl").write_text("".join(json.dumps(it) + "\n" for it in _items(FORCED_ITEMS)))
    source = (LOCAL_TASKS_DIR / "kjv_cloze" / "utils.py").read_text()
    (folder / "utils.py").write_text(source.replace("kjv_cloze.jsonl", "forced.jsonl"))
    yaml_text = (LOCAL_TASKS_DIR / "kjv_cloze" / "kjv_cloze.yaml").read_text()
    (folder / "forced.yaml").write_text(yaml_text.replace("task: kjv_cloze", "task: forced"))
    return folder.parent


def bigram_model(items, tokenizer, logit=20.0):
    """A 1-layer Llama that is a bigram table: one-hot embeddings (hidden = vocab = 512), attention and MLP
    outputs zero (o_proj, down_proj = 0), so the logits after token t are the LM head's column for t, set to
    ``logit`` for each step of every item's gold path (context's last token → the gold choice's tokens) and 0
    elsewhere. The gold continuation gets a log-probability near 0, every other choice ≤ −20 or so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tokenizer)
    table = torch.zeros(vocab, vocab)
    for item in items:
        context = tokenizer.encode(item["context"])
        gold = tokenizer.encode(item["context"] + " " + item["choices"][item["label"]])[len(context):]
        path = [context[-1], *gold]
        for a, b in zip(path, path[1:]):
            table[b, a] = logit
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(table / vocab ** 0.5)  # the final RMSNorm turns a one-hot row into √vocab · it
    return model


def with_logits(model, transform):
    """``model`` whose forward returns ``transform(logits)``: the wrong variants the scoring must tell apart."""
    forward = model.forward

    def transformed(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = transform(out.logits)
        return out

    model.forward = transformed
    return model


VARIANTS = {
    "true": lambda logits: logits,
    "shifted": lambda logits: torch.cat([logits[:, :1], logits[:, :-1]], dim=1),  # one position late
    "uniform": torch.zeros_like,
}


def test_lm_eval_scores_the_forced_answers_and_rejects_wrong_logits(forced_task):
    """The true logits score acc = acc_norm = 1 (every gold continuation is forced); logits shifted by one position
    and uniform logits score less, and each differently: lm-eval's numbers equal the written-out scoring's for
    every variant, so the harness scores what the model computes, aligned to the right positions."""
    from paretoq.eval.harness import run_tasks
    from paretoq.loading import load_tokenizer

    tokenizer = load_tokenizer(FIXTURE)
    items = _items(FORCED_ITEMS)
    got = {}
    for name, transform in VARIANTS.items():
        model = with_logits(bigram_model(items, tokenizer), transform)
        metrics = run_tasks(model, tokenizer, ["forced"], include_path=str(forced_task), batch_size=8)["tasks"]["forced"]
        got[name] = (metrics["acc"], metrics["acc_norm"])
        assert got[name] == pytest.approx(reference_accuracy(model, tokenizer, items, 256)), name
    assert got["true"] == (1.0, 1.0)
    assert got["shifted"] != got["true"] and got["uniform"] != got["true"] and got["shifted"] != got["uniform"]
    assert max(got["shifted"] + got["uniform"]) <= 0.5, got


def _packed_layer_calls(monkeypatch) -> collections.Counter:
    """Counts PackedLinear forwards, per layer object, from now on."""
    from paretoq.quant.packed import PackedLinear

    calls = collections.Counter()
    forward = PackedLinear.forward

    def counted(self, x):
        calls[id(self)] += 1
        return forward(self, x)

    monkeypatch.setattr(PackedLinear, "forward", counted)
    return calls


def _assert_every_packed_layer_ran(calls, layers=7):
    assert len(calls) == layers, f"{len(calls)} of {layers} packed layers ran"
    assert len(set(calls.values())) == 1 and min(calls.values()) >= 1, calls  # each in every forward


@pytest.fixture(scope="module")
def packed_bigram(tmp_path_factory):
    from paretoq import QuantConfig, quantize_model, save_packed
    from paretoq.loading import load_tokenizer

    tokenizer = load_tokenizer(FIXTURE)
    model = bigram_model(_items(FORCED_ITEMS), tokenizer)
    quantize_model(model, QuantConfig(w_bits=4))
    folder = tmp_path_factory.mktemp("bigram") / "packed"
    save_packed(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_packed_model_is_evaluated_packed(packed_bigram, forced_task, tmp_path, monkeypatch):
    """`paretoq eval --tasks` on a packed folder runs the loaded PackedLinear layers themselves (every one, in
    every forward) and scores the forced answers."""
    calls = _packed_layer_calls(monkeypatch)
    out = tmp_path / "r.json"
    assert cli(["eval", "--model", str(packed_bigram), "--tasks", "forced", "--include_path", str(forced_task),
                "--output", str(out), "--no_progress"]) == 0
    result = json.loads(out.read_text())
    assert result["format"] == "packed" and result["w_bits"] == 4
    assert (result["lm_eval"]["tasks"]["forced"]["acc"], result["lm_eval"]["tasks"]["forced"]["acc_norm"]) == (1, 1)
    _assert_every_packed_layer_ran(calls)


def test_a_dequantizing_loader_fails_the_packed_check(packed_bigram, forced_task, tmp_path, monkeypatch):
    """Negative control: were the packed layers swapped for plain Linear layers holding the dequantized weights
    (same numbers, not the packed model), the check above would reject the evaluation."""
    import paretoq.loading
    from paretoq.quant.packed import PackedLinear

    load_model = paretoq.loading.load_model

    def dequantizing_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        for name, module in list(model.named_modules()):
            if isinstance(module, PackedLinear):
                weight = module.dequantized_weight(next(model.parameters()).dtype)
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=False, dtype=weight.dtype)
                linear.weight.data.copy_(weight)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear)
        return model

    monkeypatch.setattr(paretoq.loading, "load_model", dequantizing_load_model)
    calls = _packed_layer_calls(monkeypatch)
    assert cli(["eval", "--model", str(packed_bigram), "--tasks", "forced", "--include_path", str(forced_task),
                "--output", str(tmp_path / "r.json"), "--no_progress"]) == 0
    with pytest.raises(AssertionError, match="0 of 7 packed layers ran"):
        _assert_every_packed_layer_ran(calls)


# --- the shipped task on the fixture ------------------------------------------------------------------------------


def test_shipped_task_yaml_is_valid():
    from paretoq.eval.harness import LOCAL_TASKS_DIR, local_task_names

    text = (LOCAL_TASKS_DIR / "kjv_cloze" / "kjv_cloze.yaml").read_text().replace("!function", "")
    cfg = yaml.safe_load(text)
    assert cfg["task"] == "kjv_cloze" and cfg["output_type"] == "multiple_choice"
    assert local_task_names() == ["kjv_cloze"]
    items = _items(300)
    assert len(items) == 300 and all(len(it["choices"]) == 4 and it["choices"][it["label"]] for it in items)


def test_lm_eval_kjv_cloze_on_fixture(tmp_path, capsys):
    from paretoq.loading import load_model, load_tokenizer

    out = tmp_path / "lm_eval.json"
    before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    assert cli(["eval", "--model", str(FIXTURE), "--tasks", "kjv_cloze", "--limit", str(LIMIT),
                "--batch_size", "8", "--output", str(out), "--no_progress"]) == 0
    assert {k: os.environ.get(k) for k in before} == before  # offline switches restored afterwards
    result = json.loads(out.read_text())
    metrics = result["lm_eval"]["tasks"]["kjv_cloze"]
    assert result["lm_eval"]["n_samples"]["kjv_cloze"] == {"original": 300, "effective": LIMIT}
    acc, acc_norm = reference_accuracy(load_model(FIXTURE), load_tokenizer(FIXTURE), _items(LIMIT), 64)
    assert metrics["acc"] == pytest.approx(acc) and metrics["acc_norm"] == pytest.approx(acc_norm)
    assert metrics["acc_stderr"] > 0
    table = capsys.readouterr().out
    assert "kjv_cloze" in table and f"{metrics['acc']:.4f}" in table


def test_unknown_task_is_one_line(monkeypatch, capsys):
    from lm_eval.tasks import TaskManager

    from paretoq.eval import harness

    # the full lm-eval index takes ~15 s to build; the message is the same with the local one
    monkeypatch.setattr(harness, "task_manager", lambda tasks, include_path=None: TaskManager(
        include_path=harness._include_paths(include_path), include_defaults=False))
    assert cli(["eval", "--model", str(FIXTURE), "--tasks", "kjv_cloze,no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown lm-eval task 'no_such_task'" in err and "--list_tasks" in err and "kjv_cloze" in err
