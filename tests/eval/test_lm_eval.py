"""`paretoq eval --tasks`: lm-eval on the tiny MiniCPM4 fixture with the shipped offline task."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from conftest import FIXTURE
from paretoq.cli import main as cli

pytest.importorskip("lm_eval")

LIMIT = 6


def _items(n):
    from paretoq.eval.harness import LOCAL_TASKS_DIR

    lines = (LOCAL_TASKS_DIR / "kjv_cloze" / "kjv_cloze.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def reference_accuracy(model, tokenizer, items, max_length):
    """lm-eval's multiple-choice scoring, written out: for each choice, the summed log-probability
    of the tokens of " choice" after the context (the pair encoded whole and split at the
    context's length; the input left-truncated to max_length tokens); acc = argmax == label."""
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
