"""Packed export: packed layers/models equal fake-quant with fp16-rounded scales, sizes, loading, corrupt files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import tiny_llama
from paretoq import QuantConfig, QuantLinear, load_packed, quantize_model, save_packed
from paretoq.errors import ModelFolderError
from paretoq.quant.packed import PackedLinear, int4_grid, pack_model
from paretoq.loading import load_model
from paretoq.quant.functional import SCHEMES

BITS = [1, 1.58, 2, 3, 4]


def _trained_quant_linear(in_f, out_f, bits, group, seed=0, bias=True) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    q = QuantLinear.from_linear(lin, QuantConfig(w_bits=bits, group_size=group))
    with torch.no_grad():  # "trained" scales: not the init, different per row/group
        q.weight_clip_val.mul_(torch.empty_like(q.weight_clip_val).uniform_(0.7, 1.1))
    return q


def _round_scales(model: nn.Module, dtype=torch.float16) -> None:
    """Fake-quant reference for a packed model: the same layers with scales rounded to ``dtype``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.copy_(m.weight_clip_val.to(dtype).float())


def _quantized_tiny_llama(bits, group, hidden=64, seed=0):
    model = tiny_llama(hidden=hidden, seed=seed)
    quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(torch.empty(m.weight_clip_val.shape).uniform_(0.7, 1.1, generator=g))
    return model


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("in_f, out_f, group", [(96, 33, 32), (97, 33, None), (256, 48, 128), (128, 40, None)])
def test_packed_linear_equals_fake_quant(bits, in_f, out_f, group):
    q = _trained_quant_linear(in_f, out_f, bits, group)
    p = PackedLinear.from_quant_linear(q)
    assert p.qweight.dtype == torch.uint8 and p.scales.dtype == torch.float16
    assert p.scales.shape == (out_f, 1 if group is None else in_f // group)
    _round_scales(q)
    x = torch.randn(3, 5, in_f)
    with torch.no_grad():
        assert torch.equal(p.dequantized_weight(), q.quantized_weight())
        assert torch.equal(p(x), q(x))


@pytest.mark.parametrize("bits", BITS)
def test_packed_size_bound(bits):
    """Bytes of codes + fp16 scales ≤ 1.02 × (bits + 16/group) / 8 per weight (1.58 → 2 bits, base3 → 1.6)."""
    in_f, out_f, group = 96, 33, 32
    q = _trained_quant_linear(in_f, out_f, bits, group)
    formats = [("2bit", 2 if bits == 1.58 else bits)] + ([("base3", 1.6)] if bits == 1.58 else [])
    for fmt, code_bits in formats:
        p = PackedLinear.from_quant_linear(q, ternary_format=fmt)
        n = in_f * out_f
        actual = p.qweight.numel() + p.scales.numel() * p.scales.element_size()
        assert actual <= 1.02 * (code_bits + 16 / group) / 8 * n, (fmt, actual)
        assert p.code_format == (fmt if bits == 1.58 else f"{SCHEMES[bits].code_bits}bit")


def test_base3_equals_2bit_codes():
    q = _trained_quant_linear(96, 33, 1.58, 32)
    a, b = PackedLinear.from_quant_linear(q), PackedLinear.from_quant_linear(q, ternary_format="base3")
    assert b.qweight.numel() == -(-96 * 33 // 5) and a.qweight.numel() == 96 * 33 // 4
    assert torch.equal(a.codes(), b.codes())


def test_scales_keep_their_dtype_under_to():
    p = PackedLinear.from_quant_linear(_trained_quant_linear(64, 32, 2, 32))
    before = p.scales.clone()
    p.to(torch.bfloat16)
    assert p.scales.dtype == torch.float16 and torch.equal(p.scales, before)
    assert p.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 32])
def test_bf16_kernel_matches_dequantize(bits, group):
    """The int4 CPU kernel path equals the dequantize path up to bf16 rounding."""
    p = PackedLinear.from_quant_linear(_trained_quant_linear(128, 48, bits, group)).to(torch.bfloat16)
    assert int4_grid(p.scheme) is not None and p.kernel_group_size() in (32, 128)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = p(x).float()
        p.use_kernel = False
        slow = p(x).float()
        exact = x.float() @ p.dequantized_weight().t() + p.bias.float()
    assert p._kernel is not None
    tol = 2e-2 * exact.abs().max()
    assert (fast - exact).abs().max() <= tol and (slow - exact).abs().max() <= tol


def test_kernel_not_used_when_shape_does_not_fit():
    p = PackedLinear.from_quant_linear(_trained_quant_linear(96, 33, 2, 32)).to(torch.bfloat16)
    assert p.kernel_group_size() is None  # 33 rows: not a multiple of 16
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        y = p(x)
    assert p._kernel is None and y.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [None, 32])
def test_save_load_packed_model_logits(tmp_path, bits, group):
    model = _quantized_tiny_llama(bits, group)
    save_packed(model, tmp_path / "packed", dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)  # the model given is not changed
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "packed" and qc["version"] == 1 and qc["w_bits"] == bits and qc["group_size"] == group
    assert qc["scale_dtype"] == "float16" and qc["ternary_format"] == "2bit"
    tensors = load_file(tmp_path / "packed" / "model.safetensors")
    assert not any(k.endswith("weight_clip_val") for k in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    packed = load_packed(tmp_path / "packed")
    assert isinstance(packed.model.layers[1].mlp.down_proj, PackedLinear)
    _round_scales(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, model(ids).logits)


@pytest.mark.parametrize("group", [None, 32])
def test_save_load_ternary_model_in_base3(tmp_path, group):
    """A whole 1.58-bit model saved with base-3 codes (5 per byte): the file holds base-3 bytes, and both loaders
    give back the 2-bit export's codes and, bit for bit, the fake-quant model's logits with fp16 scales."""
    model = _quantized_tiny_llama(1.58, group)
    save_packed(model, tmp_path / "base3", dtype=torch.float32, ternary_format="base3")
    save_packed(model, tmp_path / "2bit", dtype=torch.float32)
    qc = json.loads((tmp_path / "base3" / "config.json").read_text())["quantization_config"]
    assert qc["w_bits"] == 1.58 and qc["ternary_format"] == "base3" and qc["group_size"] == group
    base3 = load_file(tmp_path / "base3" / "model.safetensors")
    two_bit = load_file(tmp_path / "2bit" / "model.safetensors")
    names = [k for k in base3 if k.endswith(".qweight")]
    assert len(names) == 14
    for name in names:
        layer = model.get_submodule(name.removesuffix(".qweight"))
        n = layer.in_features * layer.out_features
        assert base3[name].numel() == -(-n // 5) and two_bit[name].numel() == -(-n // 4), name
    _round_scales(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    reference = load_packed(tmp_path / "2bit")
    for loaded in (load_packed(tmp_path / "base3"), AutoModelForCausalLM.from_pretrained(tmp_path / "base3")):
        layers = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
        assert len(layers) == 14 and {m.code_format for m in layers} == {"base3"}
        for name, m in loaded.named_modules():
            if isinstance(m, PackedLinear):
                assert torch.equal(m.codes(), reference.get_submodule(name).codes()), name
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)


def test_from_pretrained_after_import_paretoq(tmp_path):
    model = _quantized_tiny_llama(2, 32)
    save_packed(model, tmp_path, dtype=torch.float32)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = again.model.layers[0].self_attn.o_proj
    assert isinstance(layer, PackedLinear) and layer.scales.dtype == torch.float16
    state = dict(again.named_buffers())
    assert not any(t.is_meta for t in state.values())
    file = load_file(tmp_path / "model.safetensors")
    for key in ("model.layers.0.self_attn.o_proj.qweight", "model.layers.1.mlp.gate_proj.scales"):
        assert torch.equal(state[key], file[key])  # the buffers hold the file's data, not init values
    _round_scales(model)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_pack_model_in_memory_and_bf16_default(tmp_path):
    model = _quantized_tiny_llama(1.58, None)
    ids = torch.randint(0, 128, (2, 7))
    _round_scales(model)
    with torch.no_grad():
        ref = model(ids).logits
    names = pack_model(model)
    assert len(names) == 14 and isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
    assert model.config.quantization_config["format"] == "packed"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # default export: bf16 for the unquantized tensors; re-saving a packed model keeps its codes
    save_packed(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16
    again = load_packed(tmp_path)
    assert again.dtype == torch.bfloat16
    with torch.no_grad():
        out = again(ids).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_save_packed_from_folder_copies_tokenizer(tmp_path, fixture_dir):
    import shutil

    model = _quantized_tiny_llama(4, 32)
    model.save_pretrained(tmp_path / "fake")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_dir / name, tmp_path / "fake" / name)
    save_packed(tmp_path / "fake", tmp_path / "packed", scale_dtype="bf16")
    assert (tmp_path / "packed" / "tokenizer.json").is_file()
    assert load_packed(tmp_path / "packed").model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16


def test_save_packed_refuses_unquantized_model(tmp_path):
    from paretoq.errors import UserError

    with pytest.raises(UserError, match="no quantized layers"):
        save_packed(tiny_llama(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- corrupt or mismatched folders ------------------------------------------------------------
@pytest.fixture
def packed_dir(tmp_path):
    save_packed(_quantized_tiny_llama(2, 32), tmp_path / "packed", dtype=torch.float32)
    return tmp_path / "packed"


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


KEY = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("breakage, message", [
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{KEY}.qweight", t[f"{KEY}.qweight"][:-3].clone())),
     rf"model.safetensors: tensor {KEY}.qweight has shape"),
    (lambda d: _edit_tensors(d, lambda t: t.pop(f"{KEY}.scales")), rf"model.safetensors: tensor {KEY}.scales is missing"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{KEY}.qweight", t[f"{KEY}.qweight"].to(torch.int32))),
     rf"tensor {KEY}.qweight has dtype I32"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].__setitem__("version", 7)),
     r"config.json: quantization_config.version 7 is not supported"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].__setitem__("ternary_format", "base7")),
     r"config.json: quantization_config.ternary_format 'base7' is unknown"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].__setitem__("group_size", 16)),
     r"model.safetensors: tensor model.layers.0.self_attn.q_proj.scales has shape \[64, 2\], but the config implies \[64, 4\]"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     r"model.safetensors is truncated or corrupt"),
])
def test_corrupt_packed_folder(packed_dir, breakage, message):
    breakage(packed_dir)
    with pytest.raises(ModelFolderError, match=message) as e:
        load_packed(packed_dir)
    assert "\n" not in str(e.value)


def test_load_packed_refuses_fake_folder(tmp_path):
    model = _quantized_tiny_llama(2, None)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelFolderError, match="not a packed model"):
        load_packed(tmp_path)
    assert isinstance(load_model(tmp_path).model.layers[0].mlp.up_proj, QuantLinear)
