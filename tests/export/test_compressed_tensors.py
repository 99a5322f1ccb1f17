"""compressed-tensors export: every ParetoQ grid as an exact symmetric integer grid; the folder loads in plain
transformers (its compressed-tensors integration, no paretoq import) with the packed model's fp32 logits."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURE, tiny_llama
from export.test_hf import plain_transformers_logits
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.cli import main as cli_main
from paretoq.errors import UserError
from paretoq.export.compressed_tensors import export_compressed_tensors, smallest_num_bits
from paretoq.quant.functional import SCHEMES
from paretoq.quant.packed import pack_model

GOAL = 1e-4  # issue 30: max |Δlogit| of the folder in transformers vs paretoq's packed model, fp32


def test_smallest_exact_integer_width_of_every_scheme():
    """2-bit SEQ levels ±¼, ±¾ of α are ±1, ±3 in units of α/4: int3; ternary and binary ±1: int2."""
    widths = {bits: smallest_num_bits(s.integer_grid[1]) for bits, s in SCHEMES.items()}
    assert widths == {1: 2, 1.58: 2, 2: 3, 3: 3, 4: 4}
    assert smallest_num_bits((-1, 0, 1)) == 2 and smallest_num_bits((-8, 7)) == 4 and smallest_num_bits((-5, 0)) == 4
    assert smallest_num_bits((-2, 1)) == 2 and smallest_num_bits((-2, 2)) == 3  # int2 is −2 … 1


def _quantized(bits, group, seed=0, model=None):
    model = model if model is not None else tiny_llama(layers=2, hidden=64, vocab=128, seed=seed)
    quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(0.85)  # "trained" scales, not the init
    return model


def _minicpm(bits, group):
    from transformers import AutoModelForCausalLM

    return _quantized(bits, group, model=AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval())


CASES = [  # name, model builder, num_bits asked, int width expected, strategy
    ("llama_1bit", lambda: _quantized(1, None), None, 2, "channel"),
    ("llama_2bit_as_int4", lambda: _quantized(2, None), 4, 4, "channel"),  # vLLM's W4A16 width, same integers
    ("llama_3bit_g64", lambda: _quantized(3, 64), None, 3, "group"),
    ("llama_4bit_g32", lambda: _quantized(4, 32), None, 4, "group"),
    ("minicpm_2bit", lambda: _minicpm(2, None), None, 3, "channel"),
    ("minicpm_ternary_g64", lambda: _minicpm(1.58, 64), None, 2, "group"),
]


def test_round_trip_in_plain_transformers(tmp_path):
    """Each folder, loaded by AutoModelForCausalLM.from_pretrained in a fresh interpreter without paretoq, gives
    paretoq's packed model's fp32 logits within 1e-4; control: the same folder with one layer's scales × 1.01 is
    caught (≥ 10× the bound)."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    folders, refs = [], []
    for name, build, num_bits, width, strategy in CASES:
        model = build()
        folder = export_compressed_tensors(model, tmp_path / name, num_bits=num_bits, scale_dtype="fp32",
                                           dtype="fp32")
        assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)  # not modified
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        groups = list(qc["config_groups"].values())
        assert {g["weights"]["num_bits"] for g in groups} == {width}
        assert {(g["weights"]["type"], g["weights"]["symmetric"]) for g in groups} == {("int", True)}
        if name == "llama_3bit_g64":  # in_features 64 = one group (a row: channel), 128 = two (group 64)
            assert sorted((g["weights"]["strategy"], g["weights"]["group_size"]) for g in groups) == \
                [("channel", None), ("group", 64)]
            assert "model.layers.1.mlp.down_proj" in next(g for g in groups if g["weights"]["group_size"])["targets"]
            assert sum(len(g["targets"]) for g in groups) == 14 and qc["ignore"] == []
        else:
            assert [g["weights"]["strategy"] for g in groups] == [strategy]
            assert groups[0]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
        tensors = load_file(folder / "model.safetensors")
        up = model.model.layers[0].mlp.up_proj
        packed = tensors["model.layers.0.mlp.up_proj.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (up.out_features, math.ceil(up.in_features * width / 32))
        assert "model.layers.0.mlp.up_proj.weight" not in tensors
        packed_model = copy.deepcopy(model)
        pack_model(packed_model, scale_dtype=torch.float32)
        with torch.no_grad():
            refs.append(packed_model(ids).logits)
        folders.append(folder)
    # control: one layer's scales 1 % off
    wrong = tmp_path / "wrong"
    control = [name for name, *_ in CASES].index("minicpm_2bit")
    shutil.copytree(folders[control], wrong)
    tensors = load_file(wrong / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] *= 1.01
    from safetensors.torch import save_file

    save_file(tensors, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    outs = plain_transformers_logits([*folders, wrong], ids, tmp_path)
    for (name, *_), ref, out in zip(CASES, refs, outs):
        err = (out["logits"] - ref).abs().max().item()
        assert err <= GOAL, f"{name}: max |Δlogit| {err:.3g} > {GOAL}"
        assert out["dtype"] == "torch.float32"
    assert (outs[-1]["logits"] - refs[control]).abs().max().item() >= 10 * GOAL


def test_refusals(tmp_path):
    model = _quantized(4, None)
    with pytest.raises(UserError, match=r"layer model.layers.0.self_attn.q_proj \(4-bit, integers \[-8, .*7\]\) "
                                        r"needs int4, more than --ct_num_bits 2"):
        export_compressed_tensors(model, tmp_path / "a", num_bits=2)
    with pytest.raises(UserError, match="num_bits 5 is not supported: use one of 2, 3, 4, 8"):
        export_compressed_tensors(model, tmp_path / "b", num_bits=5)
    with pytest.raises(UserError, match="has no quantized layers"):
        export_compressed_tensors(tiny_llama(), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_cli_exports_and_refuses(tmp_path, capsys):
    model = _quantized(2, 32)
    model.save_pretrained(tmp_path / "fake")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, tmp_path / "fake" / name)
    assert cli_main(["export", "--model", str(tmp_path / "fake"), "--format", "compressed-tensors",
                     "--output", str(tmp_path / "ct")]) == 0
    assert "wrote compressed-tensors export" in capsys.readouterr().out
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"] == {**qc["config_groups"]["group_0"]["weights"],
                                                         "num_bits": 3, "strategy": "group", "group_size": 32}
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    assert load_file(tmp_path / "ct" / "model.safetensors")["model.layers.0.mlp.up_proj.weight_scale"].dtype == \
        torch.float16
    assert cli_main(["export", "--model", str(tmp_path / "fake"), "--format", "compressed-tensors",
                     "--output", str(tmp_path / "ct2"), "--ct_num_bits", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs int3, more than --ct_num_bits 2" in err[0]
    tiny_llama().save_pretrained(tmp_path / "plain")
    assert cli_main(["export", "--model", str(tmp_path / "plain"), "--format", "compressed-tensors",
                     "--output", str(tmp_path / "ct3")]) == 2
    assert "unquantized model" in capsys.readouterr().err
