"""A new user's first hour, through the real CLI: re-runs that change nothing, no silent full-precision
runs, MiniCPM hf exports that load without paretoq, Hub ids, one-line help for a bare `train`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE, TEXT, train_argv
from paretoq.cli import main as cli


# a new user's run: the defaults for logging (every 10 steps) and reporting (TensorBoard), a constant LR
USER = dict(save_steps=3, logging_steps=None, report_to=None, lr_scheduler_type="constant")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step 2-bit run, finished (checkpoint-3, final model, results)."""
    out = tmp_path_factory.mktemp("first_hour") / "run"
    assert cli(["train", *train_argv(out, steps=3, **USER)]) == 0
    return out


def test_rerunning_a_finished_run_changes_no_file(finished_run, caplog, capsys):
    before = _files(finished_run)
    caplog.set_level("INFO", logger="paretoq")
    assert cli(["train", *train_argv(finished_run, steps=3, **USER)]) == 0
    assert _files(finished_run) == before  # every file byte for byte, no checkpoint-4
    assert "training is already complete (step 3 of 3, checkpoint-3)" in caplog.text
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["perplexity"] == json.loads((finished_run / "all_results.json").read_text())["perplexity"]


def test_a_larger_max_steps_resumes_and_says_from_where(finished_run, tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    caplog.set_level("INFO", logger="paretoq")
    assert cli(["train", *train_argv(out, steps=4, **USER)]) == 0
    assert f"resuming from {out / 'checkpoint-3'} (step 3 of 4)" in caplog.text
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 4


def test_a_finished_checkpoint_without_its_final_model_is_published_without_training(finished_run, tmp_path, caplog):
    """Killed after the last checkpoint, before the final model: the re-run writes it from that
    checkpoint, takes no further step, and its weights are the checkpoint's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for name in ("model.safetensors", "config.json", "all_results.json"):
        (out / name).unlink()
    caplog.set_level("INFO", logger="paretoq")
    assert cli(["train", *train_argv(out, steps=3, **USER)]) == 0
    assert "training is complete there, writing the final model" in caplog.text
    assert not (out / "checkpoint-4").exists()
    final, ckpt = load_file(out / "model.safetensors"), load_file(out / "checkpoint-3" / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_a_short_run_logs_its_last_step_and_draws_the_plot(finished_run):
    """logging_steps is 10 by default; a 3-step run still logs step 3 and writes loss.png."""
    state = json.loads((finished_run / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [3]
    assert (finished_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_written_atomically_honour_the_umask(finished_run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "all_results.json", "trainer_state.json", "loss.png"):
        assert stat.S_IMODE((finished_run / name).stat().st_mode) == 0o666 & ~mask, name


def test_w_bits_is_required_and_16_is_not_called_quantized(tmp_path, capsys, caplog):
    assert cli(["train", *train_argv(tmp_path / "x", w_bits=None, **USER)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "paretoq train: error: missing --w_bits (paretoq train --help lists every flag; `paretoq demo` runs a "
        "complete example on a built-in model and data)"]
    caplog.set_level("INFO", logger="paretoq")
    out = tmp_path / "fp"
    assert cli(["train", *train_argv(out, bits=16, steps=1, **USER)]) == 0
    assert f"final model (not quantized): {out}" in caplog.text and "quantized model" not in caplog.text
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_train_without_arguments_names_every_missing_flag_and_the_demo(capsys):
    assert cli(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["paretoq train: error: missing --input_model_filename, --train_data_local_path, --w_bits, "
                   "--output_dir (paretoq train --help lists every flag; `paretoq demo` runs a complete example on "
                   "a built-in model and data)"]


def test_info_eval_export_generate_take_the_folder_either_way(finished_run, capsys):
    assert cli(["info", str(finished_run)]) == 0
    positional = capsys.readouterr().out
    assert cli(["info", "--model", str(finished_run)]) == 0
    assert capsys.readouterr().out == positional and "w_bits 2" in positional
    assert cli(["info", str(finished_run), "--model", str(FIXTURE)]) == 2
    assert "two models given" in capsys.readouterr().err
    assert cli(["generate", str(finished_run), "--prompt", "In the", "--max_new_tokens", "2"]) == 0


def test_exports_carry_the_training_length_to_eval(finished_run, tmp_path, capsys):
    packed = tmp_path / "packed"
    assert cli(["export", str(finished_run), "--format", "packed", "--output", str(packed)]) == 0
    assert cli(["eval", "--model", str(packed), "--data", str(TEXT / "kjv_eval.jsonl"), "--output",
                str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["perplexity"]["context"] == 32  # --model_max_length


def test_a_csv_data_file_is_an_unsupported_type(tmp_path, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text\nIn the beginning\n")
    assert cli(["train", *train_argv(tmp_path / "out", train_data_local_path=data, **USER)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"paretoq train: error: {data}: unsupported file type '.csv': use JSONL")
    assert not (tmp_path / "out").exists()


# -- MiniCPM hf export: a LlamaForCausalLM folder that plain transformers loads ------------------------------

_PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, ids_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    out = {k: model(v, use_cache=False).logits for k, v in ids.items()}
torch.save(out, ids_file + ".logits")
print(json.dumps({"class": type(model).__name__, "paretoq": any(m.startswith("paretoq") for m in sys.modules)}))
"""


def _plain_logits(folder: Path, ids: dict) -> dict:
    ids_file = folder.parent / f"{folder.name}-ids.pt"
    torch.save(ids, ids_file)
    r = subprocess.run([sys.executable, "-c", _PLAIN, str(folder), str(ids_file)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ""}, cwd=folder.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"class": "LlamaForCausalLM", "paretoq": False}
    return torch.load(str(ids_file) + ".logits")


def _minicpm_ids(ref):
    return {"short": ref["input_ids_short"], "long": ref["input_ids_long"]}  # 40 and 80 > 64 positions (long factors)


@pytest.mark.parametrize("bits", [16, 2, 1.58])
def test_minicpm_hf_export_is_a_llama_folder_with_the_same_logits(tmp_path, bits, ref):
    from paretoq import QuantConfig, quantize_model
    from paretoq.export.hf import export_hf
    from paretoq.loading import load_model

    model = load_model(FIXTURE, dtype=torch.float32)
    if bits != 16:
        quantize_model(model, QuantConfig(w_bits=bits))
    ids = _minicpm_ids(ref)
    with torch.no_grad():
        ours = {k: model(v, use_cache=False).logits for k, v in ids.items()}
    out = export_hf(model, tmp_path / "hf", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["rope_parameters"]["rope_type"] == "longrope"
    theirs = _plain_logits(out, ids)
    for k in ids:  # the folded scalings and transformers' LongRoPE angles round differently: a few ulp
        err = float((ours[k] - theirs[k]).abs().max())
        assert err < 5e-6, (k, err)


def test_minicpm_hf_export_through_the_cli_and_a_negative_control(tmp_path, ref):
    """`paretoq export --format hf` of the fixture; unfolded weights (the μP scalings dropped) are far off."""
    ids = _minicpm_ids(ref)
    from paretoq.loading import load_model

    with torch.no_grad():
        ours = load_model(FIXTURE, dtype=torch.float32)(ids["short"], use_cache=False).logits
    out = tmp_path / "hf"
    assert cli(["export", "--model", str(FIXTURE), "--format", "hf", "--output", str(out), "--dtype", "fp32"]) == 0
    theirs = _plain_logits(out, {"short": ids["short"]})["short"]
    assert float((ours - theirs).abs().max()) < 5e-6
    raw = load_file(FIXTURE / "model.safetensors")
    tensors = load_file(out / "model.safetensors")
    tensors.update({k: v for k, v in raw.items() if "o_proj" in k or "down_proj" in k})  # scalings not folded
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"))
    wrong = _plain_logits(out, {"short": ids["short"]})["short"]
    assert float((ours - wrong).abs().max()) > 1e-2


def test_minicpm_that_always_rotates_with_the_long_factors_exports_exactly(tmp_path, ref):
    """max_position_embeddings > original_max_position_embeddings: MiniCPM uses the long factors even for
    short inputs; the Llama folder gets the long factors as its short ones."""
    import shutil

    from paretoq.export.hf import export_hf
    from paretoq.loading import load_model

    folder = tmp_path / "minicpm-long"
    shutil.copytree(FIXTURE, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 256
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_model(folder, dtype=torch.float32)
    assert model.model.rotary_emb.uses_long_factors(8)
    ids = {"short": _minicpm_ids(ref)["short"]}
    with torch.no_grad():
        ours = model(ids["short"], use_cache=False).logits
    out = export_hf(model, tmp_path / "hf", dtype=torch.float32)
    theirs = _plain_logits(out, ids)["short"]
    assert float((ours - theirs).abs().max()) < 5e-6


# -- Hub ids ----------------------------------------------------------------------------------------------------

def _hub_cache(root: Path, repo: str, source: Path) -> Path:
    """A local Hugging Face hub cache holding ``source`` as the main snapshot of ``repo``."""
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    import shutil

    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _use_cache(monkeypatch, hub: Path) -> None:
    """This process and its children read the hub cache ``hub``, offline."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))  # read at import; the env is for children
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_a_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch, capsys):
    snapshot = _hub_cache(tmp_path, "paretoq-tests/minicpm4-tiny", FIXTURE)
    _use_cache(monkeypatch, tmp_path / "hub")
    from paretoq.loading import model_dir

    assert model_dir("paretoq-tests/minicpm4-tiny") == snapshot
    r = subprocess.run([sys.executable, "-m", "paretoq.cli", "info", "paretoq-tests/minicpm4-tiny", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(snapshot)
    r = subprocess.run([sys.executable, "-m", "paretoq.cli", "info", "paretoq-tests/not-there"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "paretoq info: error: paretoq-tests/not-there is not a folder, and the Hugging Face cache has no model "
        "paretoq-tests/not-there: download it first (hf download paretoq-tests/not-there) or give the model's folder"]


def test_training_from_a_hub_id(tmp_path, monkeypatch):
    _hub_cache(tmp_path, "paretoq-tests/minicpm4-tiny", FIXTURE)
    _use_cache(monkeypatch, tmp_path / "hub")
    assert cli(["train", *train_argv(tmp_path / "run", steps=1, input_model_filename="paretoq-tests/minicpm4-tiny",
                                     **USER)]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
