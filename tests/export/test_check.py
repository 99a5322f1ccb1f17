"""The agreement report of an export (``paretoq export ... --check``): top-1 agreement and mean KL of the engine's
next-token distributions against paretoq's model."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

from conftest import FIXTURE, TEXT, tiny_llama
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.cli import main as cli_main
from paretoq.errors import UserError
from paretoq.export.check import agreement, check_export, token_windows

EVAL = TEXT / "kjv_eval.jsonl"


def test_agreement_figures():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert agreement(ref, ref) == (1.0, 0.0, 0.0, 2)
    top1, kl, diff, n = agreement(ref, torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]]))
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64), 0)
    assert top1 == 0.5 and diff == 2.0 and n == 2
    assert kl == pytest.approx(float((p * (p / q).log()).sum()) / 2, rel=1e-12)
    assert agreement(ref, ref + 5.0)[1] == pytest.approx(0.0, abs=1e-12)  # a constant shift is the same distribution
    with pytest.raises(UserError, match="shape"):
        agreement(ref, ref[:1])


def test_window_perplexity():
    """Each window's positions predict its own next tokens; the last position of a window predicts nothing."""
    from paretoq.export.check import window_perplexity

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3],
                                     [0.25, 0.5, 0.25], [0.9, 0.05, 0.05]], dtype=torch.float64))
    # windows [0, 2, 1] and [1, 0]: p(2 | pos 0) = 0.25, p(1 | pos 1) = 0.1, p(0 | pos 3) = 0.25
    want = math.exp(-(math.log(0.25) + math.log(0.1) + math.log(0.25)) / 3)
    assert window_perplexity(logits, [[0, 2, 1], [1, 0]]) == pytest.approx(want, rel=1e-12)


def test_token_windows():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    windows = token_windows(EVAL, tok, 150, 64)
    assert [len(w) for w in windows] == [64, 64, 22]
    first = tok(__import__("json").loads(EVAL.read_text().splitlines()[0])["text"] + "\n\n").input_ids
    assert windows[0] == first[:64]
    with pytest.raises(UserError, match="must be positive"):
        token_windows(EVAL, tok, 0, 64)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check") / "fake"
    model = tiny_llama(layers=2, hidden=64, vocab=512)
    quantize_model(model, QuantConfig(w_bits=2, group_size=32))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.copy_((m.weight_clip_val * 0.9).half().float())  # fp16-exact: packing keeps them
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, folder / name)
    return folder


def test_check_packed_and_compressed_tensors_agree_fully(fake_dir, tmp_path):
    """Exact exports agree on every position (KL ~ 0); control: a compressed-tensors folder whose scales are
    stored in bf16 (rounded) is measurably further away."""
    from paretoq.export.compressed_tensors import export_compressed_tensors
    from paretoq.export.packed import save_packed

    packed = save_packed(fake_dir, tmp_path / "packed", dtype=torch.float32)
    ct = export_compressed_tensors(fake_dir, tmp_path / "ct", dtype="fp32", scale_dtype="fp32")
    rounded = export_compressed_tensors(fake_dir, tmp_path / "ct_bf16", dtype="bf16", scale_dtype="bf16")
    reports = {name: check_export(fake_dir, path, fmt, EVAL, tokens=200)
               for name, path, fmt in (("packed", packed, "packed"), ("ct", ct, "compressed-tensors"),
                                       ("bf16", rounded, "compressed-tensors"))}
    for name in ("packed", "ct"):
        r = reports[name]
        assert r.tokens == 200 and r.top1 == 1.0 and r.mean_kl < 1e-10 and r.max_abs_logit_diff < 1e-4, (name, r)
        assert r.ppl_engine == pytest.approx(r.ppl_reference, rel=1e-6) and 1 < r.ppl_reference < 1e4
    assert reports["bf16"].mean_kl > 1e3 * max(reports["ct"].mean_kl, 1e-12)
    assert reports["bf16"].max_abs_logit_diff > 1e-3


def test_cli_check_line(fake_dir, tmp_path, capsys):
    assert cli_main(["export", "--model", str(fake_dir), "--format", "compressed-tensors", "--output",
                     str(tmp_path / "ct"), "--scale_dtype", "fp32", "--dtype", "fp32", "--check", str(EVAL),
                     "--check_tokens", "100"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"check: transformers \(compressed-tensors\) vs paretoq's fake-quant model on 100 tokens of .*: "
                  r"top-1 agreement ([\d.]+)%, mean KL (\S+) nats", out)
    assert m and float(m.group(1)) == 100.0 and float(m.group(2)) < 1e-10, out
    m = re.search(r"perplexity (\S+) vs paretoq's (\S+)\n", out)
    assert m and m.group(1) == m.group(2), out
    assert cli_main(["export", "--model", str(fake_dir), "--format", "packed", "--output", str(tmp_path / "p"),
                     "--check", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.llamacpp
def test_check_gguf_in_llama_cpp(fake_dir, tmp_path):
    """2-bit (group 32 → Q4_0) GGUF: llama.cpp agrees with paretoq on nearly every position (its 8-bit activations
    are the only difference); control: the model exported with every scale × 1.3 (a wrong Ŵ) is far further away."""
    import copy

    from paretoq.export.gguf import export_gguf
    from paretoq.loading import load_model

    model = load_model(fake_dir, dtype=torch.float32)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=fake_dir, float_type="f32")
    good = check_export(fake_dir, path, "gguf", EVAL, tokens=200)
    wrong_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in wrong_model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(1.3)
    wrong = check_export(fake_dir, export_gguf(wrong_model, tmp_path / "w.gguf", tokenizer=fake_dir,
                                               float_type="f32"), "gguf", EVAL, tokens=200)
    assert good.tokens == 200 and good.top1 >= 0.95 and good.mean_kl < 1e-5
    assert wrong.mean_kl > 100 * good.mean_kl
