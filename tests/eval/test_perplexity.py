"""`paretoq eval` perplexity against an independent computation (the transformers docs' loop)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURE, TEXT
from paretoq.cli import main as cli


@pytest.fixture(scope="module")
def docs():
    """Two pieces of KJV chapters (~650 tokens with the fixture's tokenizer)."""
    lines = (TEXT / "kjv_eval.jsonl").read_text().splitlines()
    return [json.loads(line)["text"][:800] for line in lines[:2]]


@pytest.fixture
def data_file(tmp_path, docs):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def reference_ppl(model, tokenizer, docs, context, stride):
    """Sliding-window perplexity as in the transformers docs ("Perplexity of fixed-length models"),
    full windows only: each window's labels are its tokens not scored before (the rest -100)."""
    ids = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    nll, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(stream), stride):
        end = begin + context
        if end > len(stream):
            break
        window = stream[begin:end][None]
        labels = window.clone()
        labels[:, : context - (end - prev_end)] = -100
        with torch.no_grad():
            logits = model(window).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        n = int((shift_labels != -100).sum())
        nll += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
        count, prev_end, windows = count + n, end, windows + 1
    return math.exp(nll / count), count, windows, len(stream)


def _eval(tmp_path, *args):
    out = tmp_path / "result.json"
    assert cli(["eval", *args, "--output", str(out), "--no_progress"]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("stride", [64, 24])
def test_fp_perplexity_equals_independent_computation(tmp_path, data_file, docs, stride):
    from paretoq.loading import load_model, load_tokenizer

    result = _eval(tmp_path, "--model", str(FIXTURE), "--data", str(data_file), "--context", "64",
                   "--stride", str(stride), "--batch_size", "3")
    ppl, count, windows, tokens = reference_ppl(load_model(FIXTURE), load_tokenizer(FIXTURE), docs, 64, stride)
    p = result["perplexity"]
    assert (p["tokens"], p["windows"], p["scored_tokens"], p["context"], p["stride"]) == \
        (tokens, windows, count, 64, stride)
    assert count == 63 + (windows - 1) * min(stride, 63)
    assert p["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert p["perplexity"] == pytest.approx(math.exp(p["loss"]), rel=1e-12)
    assert result["format"] == "plain" and result["dtype"] == "float32"
    if stride == 64:  # the random fixture: close to its vocabulary size of 512
        assert 300 < p["perplexity"] < 800


def test_default_context_and_max_windows(tmp_path, data_file):
    # no paretoq_config.yaml: min(2048, max_position_embeddings = 64)
    result = _eval(tmp_path, "--model", str(FIXTURE), "--data", str(data_file), "--max_windows", "3")
    assert result["perplexity"]["context"] == 64 and result["perplexity"]["windows"] == 3
    assert result["perplexity"]["scored_tokens"] == 3 * 63
    # a trained folder: the training block size from its paretoq_config.yaml
    model_dir = tmp_path / "trained"
    shutil.copytree(FIXTURE, model_dir)
    (model_dir / "paretoq_config.yaml").write_text("model_max_length: 16\nw_bits: '16'\n")
    result = _eval(tmp_path, "--model", str(model_dir), "--data", str(data_file), "--max_windows", "2")
    assert result["perplexity"]["context"] == 16 and result["perplexity"]["stride"] == 16


def test_fake_quant_and_packed_models(tmp_path, data_file, docs):
    from paretoq import QuantConfig, load_packed, quantize_model, save_packed
    from paretoq.quant.packed import PackedLinear
    from paretoq.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(FIXTURE)
    fake = load_model(FIXTURE)
    quantize_model(fake, QuantConfig(w_bits=2))
    save_packed(fake, tmp_path / "packed", tokenizer=tokenizer)
    fake.save_pretrained(tmp_path / "fake")
    tokenizer.save_pretrained(tmp_path / "fake")
    ppl_fake = reference_ppl(fake, tokenizer, docs, 64, 64)[0]
    result = _eval(tmp_path, "--model", str(tmp_path / "fake"), "--data", str(data_file), "--context", "64")
    assert result["format"] == "fake" and result["w_bits"] == 2
    assert result["perplexity"]["perplexity"] == pytest.approx(ppl_fake, rel=1e-5)

    result = _eval(tmp_path, "--model", str(tmp_path / "packed"), "--data", str(data_file), "--context", "64",
                   "--dtype", "fp32")
    assert result["format"] == "packed" and result["w_bits"] == 2
    packed = load_packed(tmp_path / "packed", dtype=torch.float32)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    ppl_packed = reference_ppl(packed, tokenizer, docs, 64, 64)[0]
    assert result["perplexity"]["perplexity"] == pytest.approx(ppl_packed, rel=1e-5)
    # fp16 scales and bf16 embeddings/norms: close to the fake-quant model, not equal to the FP one
    assert result["perplexity"]["perplexity"] == pytest.approx(ppl_fake, rel=1e-2)


def _error(capsys, *args) -> str:
    assert cli(["eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_are_one_line(tmp_path, data_file, capsys):
    model = ["--model", str(FIXTURE)]
    err = _error(capsys, *model, "--data", str(data_file), "--context", "100000")
    assert "too short for one window" in err and "100000 tokens" in err
    tokens = int(err.split(": too short for one window: ")[1].split()[0])
    assert 400 < tokens < 1000 and str(data_file) in err
    assert "no such file" in _error(capsys, *model, "--data", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert f"{bad}:2: invalid JSON" in _error(capsys, *model, "--data", str(bad))
    assert "--stride must be between 1 and the context" in _error(capsys, *model, "--data", str(data_file),
                                                                   "--context", "16", "--stride", "32")
    assert "nothing to evaluate" in _error(capsys, *model)
    assert "does not exist" in _error(capsys, "--model", str(tmp_path / "nope"), "--data", str(data_file))
