"""The real CLI (subprocesses) for info / generate / export on a tiny model, and bad inputs → exit 2, one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURE, tiny_llama
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.cli import main as cli_main
from paretoq.cli.info import format_info
from paretoq.loading import folder_info

PROMPT = "In the beginning"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "paretoq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _add_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, folder / name)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """A 2-bit (group 32) fake-quant tiny Llama with the fixture tokenizer (vocab 512).

    Its scales are fp16-representable, so the packed export (fp32 tensors) computes exactly the same.
    """
    folder = tmp_path_factory.mktemp("cli") / "fake"
    model = tiny_llama(layers=2, hidden=64, vocab=512)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    quantize_model(model, QuantConfig(w_bits=2, group_size=32))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.copy_((m.weight_clip_val * 0.9).half().float())
    model.save_pretrained(folder)
    _add_tokenizer(folder)
    return folder


def _one_line_error(result, command):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paretoq {command}: error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_export_info_generate(fake_dir, capsys):
    tmp = fake_dir.parent
    r = run_cli("info", fake_dir, "--json")
    assert r.returncode == 0, r.stderr
    fake = json.loads(r.stdout)
    n_quant = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    assert fake["format"] == "fake" and fake["w_bits"] == 2 and fake["group_size"] == 32
    assert fake["quantized_parameters"] == n_quant and fake["num_quantized_layers"] == 14
    assert fake["disk_bytes"]["quantized_weights"] == 4 * n_quant  # fp32 latent weights
    assert fake["bits_per_quantized_weight"] == pytest.approx(32 + 32 / 32)

    r = run_cli("export", "--model", fake_dir, "--format", "packed", "--output", tmp / "packed", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "wrote packed export" in r.stdout and (tmp / "packed" / "tokenizer.json").is_file()
    packed = folder_info(tmp / "packed")
    assert packed["format"] == "packed" and packed["parameters"] == fake["parameters"]
    assert packed["disk_bytes"]["quantized_weights"] == n_quant * 2 // 8
    assert packed["disk_bytes"]["scales"] == n_quant // 32 * 2
    assert packed["bits_per_quantized_weight"] == pytest.approx(2 + 16 / 32)
    assert packed["disk_bytes"]["other"] == fake["disk_bytes"]["other"]  # fp32 embeddings, norms, head
    assert packed["memory_bytes"]["quantized_weights"] == n_quant // 4
    assert fake["memory_bytes"]["quantized_weights"] == 4 * n_quant
    text = format_info(folder_info(tmp / "packed"))
    assert "w_bits 2, scales per group of 32 in float16" in text and "model.layers.{0-1}.mlp.down_proj" in text

    # generate through the real CLI: fake-quant, and packed at its default dtype (bf16: the int4 kernel)
    outs = {}
    for name, folder, extra in [("fake", fake_dir, []), ("packed_bf16", tmp / "packed", ["--dtype", "bf16"])]:
        r = run_cli("generate", "--model", folder, "--prompt", PROMPT, "--max_new_tokens", 8, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(PROMPT) and len(r.stdout) > len(PROMPT) and "tokens/s" in r.stderr
        outs[name] = r.stdout
    # in-process (same entry point, faster): hf export, generate on hf and on packed (fp32, its folder's dtype)
    assert cli_main(["export", "--model", str(fake_dir), "--format", "hf", "--output", str(tmp / "hf")]) == 0
    hf = folder_info(tmp / "hf")
    assert hf["format"] == "plain" and hf["quantized_layers"] == [] and hf["parameters"] == fake["parameters"]
    for name, folder, extra in [("packed", tmp / "packed", []), ("hf", tmp / "hf", [])]:
        capsys.readouterr()
        assert cli_main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max_new_tokens", "8", *extra]) == 0
        outs[name] = capsys.readouterr().out
        assert outs[name].startswith(PROMPT) and len(outs[name]) > len(PROMPT)
    assert outs["packed"] == outs["fake"]  # greedy on identical fp32 logits


def _broken_folders(root, good):
    """name → (folder, message fragment) for the loader's checks."""
    cases = {}

    def folder(name):
        d = root / name
        shutil.copytree(good, d)
        return d

    cases["missing"] = (root / "nope", "does not exist")
    (root / "a_file").write_text("x")
    cases["file"] = (root / "a_file", "is not a folder")
    d = folder("no_config")
    (d / "config.json").unlink()
    cases["no_config"] = (d, "config.json is missing")
    d = folder("bad_json")
    (d / "config.json").write_text("{not json")
    cases["bad_json"] = (d, "config.json is not valid JSON")
    d = folder("unknown_type")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (d / "config.json").write_text(json.dumps(cfg))
    cases["unknown_type"] = (d, "model_type 'no_such_model' is unknown")
    d = folder("no_weights")
    (d / "model.safetensors").unlink()
    cases["no_weights"] = (d, "has no weights file")
    d = folder("pickle")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    cases["pickle"] = (d, "pytorch_model.bin: pickle weight files are not read")
    d = folder("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d, "model.safetensors is truncated or corrupt")
    return cases


def test_bad_folders_subprocess(fake_dir, tmp_path):
    cases = _broken_folders(tmp_path, fake_dir)
    for command, name, args in [("info", "missing", [cases["missing"][0]]),
                                ("generate", "truncated", ["--model", cases["truncated"][0], "--prompt", "hi"])]:
        line = _one_line_error(run_cli(command, *args), command)
        assert cases[name][1] in line, (command, name, line)


def test_bad_folders_and_flags_in_process(fake_dir, tmp_path, capsys):
    """The same CLI entry point, called in-process (fast), for every kind of bad input."""
    def check(argv, fragment):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"paretoq {argv[0]}: error:") and fragment in lines[0], err
    for name, (d, fragment) in _broken_folders(tmp_path, fake_dir).items():
        check(["info", str(d)], fragment)
        check(["export", "--model", str(d), "--format", "packed", "--output", str(tmp_path / f"out_{name}")], fragment)
        assert not (tmp_path / f"out_{name}").exists()
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(fake_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    (no_tok / "tokenizer_config.json").unlink()
    check(["generate", "--model", str(no_tok), "--prompt", "hi"], "has no tokenizer")
    check(["generate", "--model", str(fake_dir)], "--prompt")
    check(["generate", "--model", str(fake_dir), "--prompt", "hi", "--max_new_tokens", "0"], "--max_new_tokens")
    check(["export", "--model", str(fake_dir), "--format", "onnx", "--output", str(tmp_path / "x")], "invalid choice")
    check(["export", "--model", str(fake_dir), "--format", "hf", "--output", str(fake_dir)], "is the --model folder")
    check(["export", "--model", str(fake_dir), "--format", "packed", "--output", str(tmp_path / "y"),
           "--scale_dtype", "int8"], "invalid choice")
    plain = tmp_path / "plain"
    tiny_llama(vocab=512).save_pretrained(plain)
    check(["export", "--model", str(plain), "--format", "packed", "--output", str(tmp_path / "z")], "unquantized model")
    check(["info"], "required")
