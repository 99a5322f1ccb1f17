"""`paretoq sweep` on the tiny MiniCPM4 fixture: two bit widths, a few steps, every output checked."""

from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import TEXT, train_argv
from paretoq.cli import main as cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    eval_file = tmp / "eval.jsonl"  # one chapter piece: ~25 windows of 32 tokens
    first = json.loads((TEXT / "kjv_eval.jsonl").read_text().splitlines()[0])["text"][:2000]
    eval_file.write_text(json.dumps({"text": first}) + "\n")
    out = tmp / "out"
    # the train flags of conftest's tiny run, with the sweep's --bits in place of --w_bits
    argv = ["sweep", *train_argv(out, "--bits", "4,2", "--no_progress", w_bits=None, steps=3, seed=3,
                                 eval_data_local_path=eval_file, per_device_eval_batch_size=16, save_steps=None,
                                 logging_steps=None)]
    assert cli(argv) == 0
    return out, argv, eval_file


def test_outputs_are_consistent(sweep, capsys):
    out, _, eval_file = sweep
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert [(r["method"], r["bits"]) for r in rows] == [("fp", 16), ("rtn", 4), ("qat", 4), ("rtn", 2), ("qat", 2)]
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for r, c in zip(rows, table):
        assert c["method"] == r["method"] and float(c["bits"]) == r["bits"]
        for key in ("bytes_total", "bytes_quantized_weights", "bytes_scales", "bytes_other"):
            assert int(c[key]) == r[key]
        assert float(c["perplexity"]) == r["perplexity"] and float(c["bits_per_weight"]) == r["bits_per_weight"]
        assert c["pareto"] == str(r["pareto"])
        assert math.isfinite(r["perplexity"]) and r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    md = (out / "sweep.md").read_text()
    assert md.count("\n| QAT ") == 2 and md.count("\n| RTN ") == 2 and md.count("\n| FP ") == 1
    assert data["settings"]["max_steps"] == 3 and data["tokens_per_step"] == 2 * 32

    fp, rtn4, qat4, rtn2, qat2 = rows
    # byte counts: the packed folders as `paretoq info --json` counts them
    for row in (qat4, qat2):
        capsys.readouterr()
        assert cli(["info", row["model_dir"], "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == "packed" and info["w_bits"] == row["bits"]
        disk = info["disk_bytes"]
        assert (row["bytes_total"], row["bytes_quantized_weights"], row["bytes_scales"], row["bytes_other"]) == \
            (disk["tensors_total"], disk["quantized_weights"], disk["scales"], disk["other"])
        assert row["bits_per_weight"] == info["bits_per_quantized_weight"]
        # codes: exactly `bits` per weight (4 and 2 pack densely); fp16 scales, one per row
        assert disk["quantized_weights"] * 8 == row["bits"] * info["quantized_parameters"]
        assert disk["scales"] == 2 * info["scale_elements"]
    for rtn, qat in ((rtn4, qat4), (rtn2, qat2)):
        assert rtn["bytes_total"] == qat["bytes_total"] and rtn["train_seconds"] is None
    assert fp["bytes_total"] == 2 * fp["parameters"] and fp["bytes_quantized_weights"] == 2 * qat4["quantized_parameters"]
    assert fp["bytes_other"] == qat4["bytes_other"]  # the unquantized tensors are bf16 in both
    assert fp["bytes_total"] > qat4["bytes_total"] > qat2["bytes_total"]
    for qat in (qat4, qat2):
        assert qat["train_steps"] == 3 and qat["train_seconds"] > 0
        # the Trainer's own eval of the fake-quant fp32 model scores the same blocks: close to ours
        # on the packed model (fp16 scales, bf16 embeddings)
        assert qat["perplexity"] == pytest.approx(qat["train_eval_perplexity"], rel=2e-2)

    # the frontier: exactly the rows no other row beats on both size and perplexity
    for r in rows:
        beaten = any(o is not r and o["bytes_total"] <= r["bytes_total"] and o["perplexity"] <= r["perplexity"]
                     for o in rows)
        assert r["pareto"] == (not beaten)
    assert qat2["pareto"] or rtn2["pareto"]  # the smallest size always has a frontier point

    # the same number through `paretoq eval` on the packed folder
    capsys.readouterr()
    assert cli(["eval", "--model", qat2["model_dir"], "--data", str(eval_file), "--context", "32", "--dtype", "fp32",
                "--output", str(out / "check.json"), "--no_progress"]) == 0
    assert json.loads((out / "check.json").read_text())["perplexity"]["perplexity"] == pytest.approx(
        qat2["perplexity"], rel=1e-6)


def test_plot(sweep):
    from matplotlib.image import imread

    out, _, _ = sweep
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out / "pareto.png").shape[:2] == (500, 800)


def test_rerun_skips_finished_bit_widths(sweep, monkeypatch):
    import paretoq.export.packed
    import paretoq.training.run

    out, argv, _ = sweep

    def fail(*a, **k):
        raise AssertionError("a finished bit width was redone")

    monkeypatch.setattr(paretoq.training.run, "run_training", fail)
    monkeypatch.setattr(paretoq.export.packed, "save_packed", fail)
    before = json.loads((out / "sweep.json").read_text())["rows"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*_result.json")}
    assert len(stamps) == 5
    assert cli(argv) == 0
    assert json.loads((out / "sweep.json").read_text())["rows"] == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*_result.json")} == stamps


def test_changed_budget_and_bad_flags_are_one_line(sweep, capsys):
    out, argv, _ = sweep
    i = argv.index("--max_steps")
    changed = [*argv[:i + 1], "5", *argv[i + 2:]]  # --max_steps 5 into the same folder
    assert cli(changed) == 2
    err = capsys.readouterr().err
    assert "max_steps: 3" in err and "now 5" in err and len(err.strip().splitlines()) == 1
    assert cli([*argv, "--w_bits", "2"]) == 2
    assert "use --bits" in capsys.readouterr().err
    assert cli([*argv, "--bits", "4,5"]) == 2
    assert "w_bits 5 is not supported" in capsys.readouterr().err
