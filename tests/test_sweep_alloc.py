"""`paretoq sweep --budgets`: allocated mixed-precision points beside the uniform ones (tiny MiniCPM4 fixture)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TEXT, train_argv
from paretoq.cli import main as cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep_alloc")
    eval_file = tmp / "eval.jsonl"
    first = json.loads((TEXT / "kjv_eval.jsonl").read_text().splitlines()[0])["text"][:1500]
    eval_file.write_text(json.dumps({"text": first}) + "\n")
    out = tmp / "out"
    argv = ["sweep", *train_argv(out, "--bits", "4,2", "--budgets", "3", "--candidates", "2,4", "--baselines", "rtn",
                                 "--no_progress", "--calibration_samples", "4", w_bits=None, steps=2, seed=3,
                                 eval_data_local_path=eval_file, per_device_eval_batch_size=16, save_steps=None,
                                 logging_steps=None)]
    assert cli(argv) == 0
    return out, argv


def test_allocated_rows_beside_uniform_ones(sweep, capsys):
    from paretoq.quant.config import load_quant_config

    out, argv = sweep
    data = json.loads((out / "sweep.json").read_text())
    rows = {(r["method"], r["name"]): r for r in data["rows"]}
    assert list(rows) == [("rtn", "w4-rtn"), ("qat", "w4"), ("rtn", "w2-rtn"), ("qat", "w2"), ("rtn", "mix3-rtn"),
                          ("qat", "mix3")]
    mix, rtn = rows[("qat", "mix3")], rows[("rtn", "mix3-rtn")]
    assert mix["allocated"] and rtn["allocated"] and not rows[("qat", "w4")]["allocated"]
    # the budget holds on the packed folder: codes + fp16 scales per quantized weight ≤ 3 bits
    assert 2.0 < mix["bits_per_weight"] <= 3.0 and rtn["bytes_total"] == mix["bytes_total"]
    assert rows[("qat", "w2")]["bytes_total"] < mix["bytes_total"] < rows[("qat", "w4")]["bytes_total"]
    # every layer of the packed model has the bits its allocation gave it
    config = load_quant_config(out / "alloc" / "mix3.yaml")
    capsys.readouterr()
    assert cli(["info", mix["model_dir"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mixed"]
    assert {n: v["w_bits"] for n, v in info["layer_bits"].items()} == \
        {n: config.for_layer(n).w_bits for n in info["quantized_layers"]}
    md = (out / "sweep.md").read_text()
    assert re.search(r"\n\| QAT +\| mix 3 +\| per layer +\|", md) and re.search(r"\n\| RTN +\| mix 3 +\| per layer +\|", md)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_the_sensitivities_and_rows(sweep, monkeypatch):
    import paretoq.allocate
    import paretoq.training.run

    out, argv = sweep

    def fail(*a, **k):
        raise AssertionError("redone")

    monkeypatch.setattr(paretoq.allocate, "measure_sensitivity", fail)
    monkeypatch.setattr(paretoq.training.run, "run_training", fail)
    before = json.loads((out / "sweep.json").read_text())["rows"]
    assert cli(argv) == 0
    assert json.loads((out / "sweep.json").read_text())["rows"] == before


def test_bad_budget_flags(sweep, capsys):
    out, argv = sweep
    assert cli([*argv, "--quant_config", "x.yaml"]) == 2
    assert "use --budgets" in capsys.readouterr().err
    i = argv.index("--budgets")
    assert cli([*argv[:i + 1], "2,x", *argv[i + 2:]]) == 2
    assert "--budgets: 'x' is not a number of bits per weight" in capsys.readouterr().err
    assert cli([*argv[:i + 1], "0.5", *argv[i + 2:]]) == 2
    assert "outside 1..16" in capsys.readouterr().err
