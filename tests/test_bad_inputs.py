"""The catalogue of user mistakes, each run through the real CLI entry point in a fresh process.

Every case must end with exit status 2 and exactly one line on stderr, ``paretoq <cmd>: error: ...``,
that names the file / line / flag at fault; no traceback; and nothing written: each case runs in
its own folder, whose files (names, sizes, modification times) are the same after the run as before
(so no output folder, no half-written file, no leftover temporary). The security cases also check
that the payload of a malicious pickle did not run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from conftest import FIXTURE, TEXT, train_argv

TRAIN = TEXT / "kjv_train.jsonl"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# --- workspace: the broken inputs, made once ---------------------------------------------------


class Payload:
    """Unpickling this object creates ``marker`` (``open(marker, "w")``): proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy_model(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file() and name not in skip:
            shutil.copy(src / name, dst / name)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key == "quantization_config":
            cfg[key].update(value)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from paretoq import QuantConfig, quantize_model, save_packed

    root = tmp_path_factory.mktemp("bad_inputs")
    data, models = root / "data", root / "models"
    data.mkdir()
    (data / "empty.jsonl").write_bytes(b"")
    (data / "binary.jsonl").write_bytes(bytes(range(256)) * 16)  # a NUL byte on line 1
    (data / "badjson.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    (data / "notext.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    (data / "nonstr.jsonl").write_text('{"text": "a"}\n{"text": ["b"]}\n')
    (data / "tiny.jsonl").write_text('{"text": "Hi."}\n')
    (data / "bad.yaml").write_text("w_bits: [2\n")

    m = SimpleNamespace(root=root)
    m.no_config = _copy_model(FIXTURE, models / "no_config", skip=("config.json",))
    m.unknown_type = _copy_model(FIXTURE, models / "unknown_type")
    _edit_config(m.unknown_type, model_type="nonsense")
    m.config_not_json = _copy_model(FIXTURE, models / "config_not_json")
    (m.config_not_json / "config.json").write_text('{"model_type": "minicpm", "hidden_size": 128,,}')
    m.truncated = _copy_model(FIXTURE, models / "truncated")
    raw = (m.truncated / "model.safetensors").read_bytes()
    (m.truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])

    for bits, group, name in ((2, None, "fake2"), (2, 16, "fake2_g16")):
        model = AutoModelForCausalLM.from_pretrained(FIXTURE)
        quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
        model.save_pretrained(models / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(FIXTURE / f, models / name / f)
        setattr(m, name, models / name)
    packed = save_packed(m.fake2, models / "packed2")
    m.packed_shape = _copy_model(packed, models / "packed_shape")
    _edit_tensors(m.packed_shape, lambda t: t.update({
        "model.layers.1.mlp.up_proj.qweight": t["model.layers.1.mlp.up_proj.qweight"][:-4].clone()}))
    m.packed_no_scale = _copy_model(packed, models / "packed_no_scale")
    _edit_tensors(m.packed_no_scale, lambda t: t.pop("model.layers.2.self_attn.o_proj.scales"))
    m.packed_v99 = _copy_model(packed, models / "packed_v99")
    _edit_config(m.packed_v99, quantization_config={"version": 99})
    return SimpleNamespace(data=data, m=m)


# --- the cases ---------------------------------------------------------------------------------


def _train(out, *extra, **flags) -> list[str]:
    """``paretoq train`` with conftest's tiny run, ``flags`` changed (``name=None`` drops one)."""
    return ["train", *train_argv(out, *extra, **flags)]


@dataclass
class Case:
    id: str
    setup: Callable[[Path, SimpleNamespace], list[str]]  # (case folder, workspace) → argv
    expect: tuple = ()  # substrings of the error line; a tuple inside = any of them
    marker: bool = False  # the case plants a pickle payload whose marker must not appear
    marks: list = field(default_factory=list)


def _checkpoint(folder: Path, source: Path, **quant) -> Path:
    ckpt = _copy_model(source, folder / "checkpoint-2")
    if quant:
        _edit_config(ckpt, quantization_config=quant)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    return ckpt


def _pickle_bin_model(d: Path, ws) -> list[str]:
    folder = _copy_model(FIXTURE, d / "model", skip=("model.safetensors",))
    torch.save({"model.embed_tokens.weight": Payload(d / "PWNED")}, folder / "pytorch_model.bin")
    return _train(d / "out", input_model_filename=folder)


def _pickle_as_safetensors(d: Path, ws) -> list[str]:
    folder = _copy_model(FIXTURE, d / "model", skip=("model.safetensors",))
    (folder / "model.safetensors").write_bytes(pickle.dumps(Payload(d / "PWNED")))
    return ["generate", "--model", str(folder), "--prompt", "In the beginning", "--max_new_tokens", "2"]


def _malicious_optimizer(d: Path, ws) -> list[str]:
    ckpt = _checkpoint(d / "out", ws.m.fake2)
    torch.save({"state": {0: Payload(d / "PWNED")}, "param_groups": []}, ckpt / "optimizer.pt")
    return _train(d / "out")


def _other_bits_checkpoint(d: Path, ws) -> list[str]:
    _checkpoint(d / "out", ws.m.fake2, w_bits=4)
    return _train(d / "out", w_bits=2)


def _other_group_size_checkpoint(d: Path, ws) -> list[str]:
    _checkpoint(d / "out", ws.m.fake2_g16)  # 2 bits, group_size 16
    return _train(d / "out", w_bits=2)  # per-row scales (group_size None)


def _file(d: Path, name: str = "taken") -> Path:
    (d / name).write_text("a file the user already has\n")
    return d / name


CASES = [
    # -- training data
    Case("train-data-missing", lambda d, w: _train(d / "out", train_data_local_path=w.data / "none.jsonl"),
         ("none.jsonl", "no such file")),
    Case("train-data-empty", lambda d, w: _train(d / "out", train_data_local_path=w.data / "empty.jsonl"),
         ("empty.jsonl", "no documents")),
    Case("train-data-binary", lambda d, w: _train(d / "out", train_data_local_path=w.data / "binary.jsonl"),
         ("binary.jsonl:1", "binary")),
    Case("train-data-invalid-json", lambda d, w: _train(d / "out", train_data_local_path=w.data / "badjson.jsonl"),
         ("badjson.jsonl:3", "invalid JSON")),
    Case("train-data-missing-text", lambda d, w: _train(d / "out", train_data_local_path=w.data / "notext.jsonl"),
         ("notext.jsonl:2", '"text"')),
    Case("train-data-text-not-string",
         lambda d, w: _train(d / "out", train_data_local_path=w.data / "nonstr.jsonl"),
         ("nonstr.jsonl:2", "must be a string", "list")),
    Case("train-eval-data-invalid-json",
         lambda d, w: _train(d / "out", eval_data_local_path=w.data / "badjson.jsonl"), ("badjson.jsonl:3",)),
    Case("train-data-shorter-than-a-block",
         lambda d, w: _train(d / "out", train_data_local_path=w.data / "tiny.jsonl"),
         ("tiny.jsonl", "too small", "model_max_length")),
    # -- flags
    Case("train-w_bits-5", lambda d, w: _train(d / "out", w_bits=5), ("w_bits 5", "1.58")),
    Case("train-w_bits-1.5", lambda d, w: _train(d / "out", w_bits=1.5), ("w_bits 1.5",)),
    Case("train-w_bits-negative", lambda d, w: _train(d / "out", w_bits=-1), ("w_bits -1",)),
    Case("train-group_size-not-dividing", lambda d, w: _train(d / "out", group_size=48),
         ("group_size 48", "in_features 128", "model.layers.0.self_attn.q_proj")),
    Case("train-group_size-0", lambda d, w: _train(d / "out", group_size=0), ("group_size", "positive", "0")),
    Case("train-group_size-negative", lambda d, w: _train(d / "out", group_size=-32), ("group_size", "-32")),
    Case("train-model_max_length-0", lambda d, w: _train(d / "out", model_max_length=0),
         ("--model_max_length", "0")),
    Case("train-unknown-flag", lambda d, w: _train(d / "out", "--w_bitz", "2"), ("--w_bitz",)),
    Case("train-config-not-yaml", lambda d, w: _train(d / "out", config=w.data / "bad.yaml"),
         ("--config", "bad.yaml", "YAML")),
    # -- model folders
    Case("train-model-folder-missing", lambda d, w: _train(d / "out", input_model_filename=d / "nowhere"),
         ("nowhere", "does not exist")),
    Case("train-model-without-config", lambda d, w: _train(d / "out", input_model_filename=w.m.no_config),
         ("no_config/config.json", "missing")),
    Case("info-unknown-model_type", lambda d, w: ["info", str(w.m.unknown_type)], ("config.json", "'nonsense'")),
    Case("export-config-not-json",
         lambda d, w: ["export", "--model", str(w.m.config_not_json), "--format", "hf", "--output", str(d / "out")],
         ("config_not_json/config.json", "not valid JSON", "line 1")),
    Case("train-safetensors-truncated", lambda d, w: _train(d / "out", input_model_filename=w.m.truncated),
         ("truncated/model.safetensors", "truncated")),
    Case("generate-model-folder-missing", lambda d, w: ["generate", "--model", str(d / "nowhere"), "--prompt", "Hi"],
         ("nowhere", "does not exist")),
    # -- packed files
    Case("export-packed-wrong-shape",
         lambda d, w: ["export", "--model", str(w.m.packed_shape), "--format", "hf", "--output", str(d / "out")],
         ("packed_shape/model.safetensors", "model.layers.1.mlp.up_proj.qweight", "shape")),
    Case("info-packed-missing-scale", lambda d, w: ["info", str(w.m.packed_no_scale)],
         ("packed_no_scale/model.safetensors", "model.layers.2.self_attn.o_proj.scales", "missing")),
    Case("generate-unknown-packed-version",
         lambda d, w: ["generate", "--model", str(w.m.packed_v99), "--prompt", "Hi"],
         ("packed_v99/config.json", "version 99")),
    Case("export-gguf-not-exact",
         lambda d, w: ["export", "--model", str(w.m.fake2_g16), "--format", "gguf", "--output", str(d / "m.gguf")],
         ("GGUF", "group_size 16")),
    Case("export-compressed-tensors-too-narrow",
         lambda d, w: ["export", "--model", str(w.m.fake2), "--format", "compressed-tensors", "--output", str(d / "ct"),
                       "--ct_num_bits", "2"],
         ("compressed-tensors", "needs int3", "--ct_num_bits 2")),
    # -- output folders and resuming
    Case("train-output_dir-is-a-file", lambda d, w: _train(_file(d)), ("--output_dir", "taken", "is a file")),
    Case("train-output_dir-not-writable", lambda d, w: _train(_file(d) / "run"),
         ("--output_dir", "taken/run", ("not writable", "cannot be created"))),
    Case("export-output-not-writable",
         lambda d, w: ["export", "--model", str(w.m.fake2), "--format", "packed", "--output", str(_file(d) / "x")],
         ("--output", "taken", "is a file")),
    Case("train-resume-without-checkpoint", lambda d, w: _train(d / "out", "--resume"),
         ("--resume", "no checkpoint")),
    Case("train-checkpoint-of-other-w_bits",
         _other_bits_checkpoint,
         ("checkpoint-2", "w_bits=4", "w_bits=2")),
    Case("train-checkpoint-of-other-group_size",
         _other_group_size_checkpoint,
         ("checkpoint-2", "group_size=16", "group_size=None")),
    # -- pickles: refused, never unpickled
    Case("train-pickle-weights", _pickle_bin_model, ("pytorch_model.bin", "pickle"), marker=True),
    Case("generate-pickle-named-safetensors", _pickle_as_safetensors, ("model/model.safetensors", "corrupt"),
         marker=True),
    Case("train-checkpoint-malicious-optimizer", _malicious_optimizer, ("checkpoint-2/optimizer.pt", "refused"),
         marker=True),
    # -- eval and sweep
    Case("eval-data-shorter-than-a-window",
         lambda d, w: ["eval", "--model", str(FIXTURE), "--data", str(w.data / "tiny.jsonl"), "--output",
                       str(d / "results.json")], ("tiny.jsonl", "window")),
    Case("eval-unknown-lm-eval-task",
         lambda d, w: ["eval", "--model", str(FIXTURE), "--tasks", "no_such_task_xyz", "--output",
                       str(d / "results.json")], ("no_such_task_xyz",)),
    Case("sweep-unknown-bits",
         lambda d, w: ["sweep", *train_argv(d / "out", "--bits", "4,5", w_bits=None)],
         ("w_bits 5",)),
]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: (kind, size, mtime) for files, ("dir",) for folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = ("dir",) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


# Every case runs in ONE fresh `python` process (so the suite pays the start-up once, not per case): it
# calls the CLI's entry point as the `paretoq` command does, with file descriptors 1 and 2 redirected per
# case, so everything written to the terminal by paretoq or any library is captured; an exception that
# escapes the entry point is printed as a traceback (and fails the case).
_RUNNER = r"""
import json, os, sys, tempfile, traceback
from paretoq.cli import main

cases = json.load(open(sys.argv[1]))
results = {}
for case_id, argv, cwd in cases:
    os.chdir(cwd)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = "raised"
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
        out.seek(0); err.seek(0)
        results[case_id] = {"rc": rc, "stdout": out.read(), "stderr": err.read()}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def outcomes(ws, tmp_path_factory):
    """case id → (the run's rc/stdout/stderr, the case folder, its snapshot before the run)."""
    root = tmp_path_factory.mktemp("cases")
    jobs, folders, before = [], {}, {}
    for case in CASES:
        folder = root / case.id
        folder.mkdir()
        argv = [str(a) for a in case.setup(folder, ws)]
        folders[case.id], before[case.id] = folder, snapshot(folder)
        jobs.append((case.id, argv, str(folder)))
    (root.parent / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(root.parent / "jobs.json"), str(root.parent / "out.json")],
                       capture_output=True, text=True, timeout=1800, env=env, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((root.parent / "out.json").read_text())
    return {cid: (results[cid], folders[cid], before[cid]) for cid in results}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_user_mistake_gives_one_line_and_writes_nothing(case, outcomes):
    r, folder, before = outcomes[case.id]
    command = case.id.split("-")[0]
    assert "Traceback" not in r["stderr"] + r["stdout"], r["stderr"]
    assert r["rc"] == 2, f"exit status {r['rc']}\n{r['stderr']}"
    lines = r["stderr"].splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{r['stderr']}"
    line = lines[0]
    assert line.startswith(f"paretoq {command}: error: "), line
    for want in case.expect:
        options = want if isinstance(want, tuple) else (want,)
        assert any(o in line for o in options), f"{options} not in: {line}"
    if case.marker:
        assert not (folder / "PWNED").exists(), "the pickle payload ran"
    assert snapshot(folder) == before, "the failed command wrote or changed files"


def test_catalogue_covers_every_command():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} == {"train", "eval", "export", "generate", "sweep", "info"}


# --- a very long line is not a mistake -----------------------------------------------------------


def _long_line_file(path: Path, size: int) -> Path:
    words = " ".join(json.loads(line)["text"] for line in TRAIN.read_text().splitlines() if line.strip())
    text = (words * (size // len(words) + 1))[:size]
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "And a short one."}) + "\n")
    return path


def test_a_10_mb_line_is_read(tmp_path):
    from paretoq.data import read_texts

    texts = read_texts(_long_line_file(tmp_path / "long.jsonl", 10_000_000))
    assert [len(t) for t in texts] == [10_000_000, 16]


@pytest.mark.slow
def test_a_10_mb_line_trains(tmp_path):
    """One 10 MB document (≈4M tokens here) tokenises, packs and trains like any other."""
    data = _long_line_file(tmp_path / "long.jsonl", 10_000_000)
    argv = _train(tmp_path / "out", train_data_local_path=data, steps=1, save_steps=1)
    r = subprocess.run([sys.executable, "-m", "paretoq.cli", *map(str, argv)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads(r.stdout.strip().splitlines()[-1])["eval_loss"] > 0
