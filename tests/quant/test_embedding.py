"""Quantized embedding / LM head (embed_bits, head_bits) and 8-bit activations (a_bits)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURE, tiny_llama
from paretoq import QuantConfig, QuantLinear, dequantize_model, load_packed, quantize_model, save_packed
from paretoq.errors import UserError
from paretoq.loading import folder_info, load_model
from paretoq.quant.embedding import (PackedEmbedding, PackedTiedHead, QuantEmbedding, QuantHead, QuantTiedHead)
from paretoq.quant.functional import (SCHEMES, TABLE_SCHEMES, fake_quantize_activation,
                                      init_scale, quantize_backward, quantize_weight)


# -- 8-bit activations ---------------------------------------------------------------------------------------

def test_activation_fake_quant_exact_values():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.1],
                      [0.0, 0.0, 0.0, 0.0],
                      [3.0, 0.01, -3.0, 1.5]])
    got = fake_quantize_activation(x)
    # row 1: max 1, x·127 = 127, −63.5, 31.75, 12.7 → 127, −64 (half to even), 32, 13
    # row 3: max 3, x·127/3 = 127, 0.42, −127, 63.5 → 127, 0, −127, 64 (half to even)
    want = torch.tensor([[127.0, -64.0, 32.0, 13.0], [0.0, 0.0, 0.0, 0.0], [127.0, 0.0, -127.0, 64.0]])
    want = want * torch.tensor([[1.0], [1e-5], [3.0]]) / 127
    assert torch.equal(got, want)
    assert got[2, 3].item() == pytest.approx(64 * 3 / 127) and got[2, 3].item() != 1.5  # 1.5 is not on the grid
    # per token, not per tensor: a control that scales by the tensor's max gets row 1 wrong
    per_tensor = torch.round(x * 127 / x.abs().max()) * x.abs().max() / 127
    assert not torch.equal(per_tensor, got)
    # bf16 in → bf16 out, computed in fp32
    assert fake_quantize_activation(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(fake_quantize_activation(x.bfloat16()), got.bfloat16())


def test_activation_fake_quant_straight_through_gradient():
    x = torch.randn(3, 7, 16, requires_grad=True)
    g = torch.randn(3, 7, 16)
    (fake_quantize_activation(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    # control: the rounding itself has zero gradient almost everywhere
    y = torch.randn(4, 8, requires_grad=True)
    (torch.round(y * 10) / 10 * g[0, :4, :8]).sum().backward()
    assert torch.count_nonzero(y.grad) == 0


def test_activation_fake_quant_per_block():
    """Blocks of 32 (llama.cpp's Q8_0 activations): each block's own max; per token = one block of the row."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 64)  # later features larger: the blocks' maxima differ
    got = fake_quantize_activation(x, 32)
    for b in range(2):
        xb = x[..., 32 * b:32 * (b + 1)]
        m = xb.abs().amax(-1, keepdim=True)
        assert torch.equal(got[..., 32 * b:32 * (b + 1)], torch.round(xb * 127 / m) * m / 127)
    assert torch.equal(fake_quantize_activation(x, 64), fake_quantize_activation(x))
    assert not torch.equal(got, fake_quantize_activation(x))  # control: per token rounds the small block coarser
    assert (got - x).abs()[..., :32].max() < (fake_quantize_activation(x) - x).abs()[..., :32].max()
    y = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (fake_quantize_activation(y, 32) * g).sum().backward()
    assert torch.equal(y.grad, g)
    with pytest.raises(ValueError, match="activation block 48 does not divide the 64 input features"):
        fake_quantize_activation(x, 48)


def test_a_group_size_config_and_layers():
    from paretoq.quant.functional import gguf_activation_block

    c = QuantConfig(w_bits=2, a_bits=8, a_group_size="32")
    assert c.a_group_size == 32 and c.activation_block("x", 576) == 32
    assert QuantConfig.from_dict(c.to_dict()).a_group_size == 32 and c.to_dict()["a_group_size"] == 32
    assert "a_group_size" not in QuantConfig(w_bits=2, a_bits=8).to_dict()  # per token: as before
    assert QuantConfig(w_bits=2, a_bits=8, a_group_size="token").a_group_size is None
    g = QuantConfig(w_bits=2, a_bits=8, a_group_size="GGUF")
    assert g.a_group_size == "gguf" and QuantConfig.from_dict(g.to_dict()).a_group_size == "gguf"
    # gguf: 2/3-bit rows that are multiples of 256 are K-quants (Q8_K activations), the rest Q8_0's 32
    assert (g.activation_block("a", 1536), g.activation_block("b", 576)) == (256, 32)
    assert QuantConfig(w_bits=4, a_bits=8, a_group_size="gguf").activation_block("a", 1536) == 32
    assert g.activation_block("lm_head", 1536, table=True) == 32  # tables are Q4_0 / Q8_0
    assert gguf_activation_block(3, 64, 1024) == 32 and gguf_activation_block(3, 512, 1024) == 256
    assert QuantConfig(w_bits=2, a_bits=8).activation_block("a", 576) is None
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, QuantConfig(w_bits=2, a_bits=8, a_group_size=32))
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(fake_quantize_activation(x, 32), q.quantized_weight(), lin.bias))
    with pytest.raises(UserError, match="a_group_size 48 does not divide in_features 64 of layer l: use a divisor"):
        QuantLinear.from_linear(lin, QuantConfig(w_bits=2, a_bits=8, a_group_size=48), name="l")


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=2, a_group_size=32), "a_group_size applies to 8-bit activations: set a_bits to 8"),
    (dict(w_bits=2, a_bits=8, a_group_size="x"), "a_group_size 'x' is not supported: use a positive integer"),
    (dict(w_bits=2, a_bits=8, a_group_size=0), "a_group_size 0 is not supported"),
])
def test_a_group_size_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        QuantConfig(**kwargs)


def test_a_bits_off_by_default_and_on_in_quant_linear():
    assert QuantConfig(w_bits=2).a_bits == 16
    d = QuantConfig(w_bits=2).to_dict()
    assert set(d) == {"quant_method", "w_bits", "group_size", "include", "exclude", "scale_init", "format", "version"}
    assert d["version"] == 1  # what it always was; a config using the new fields is version 2
    assert QuantConfig(w_bits=2, a_bits=8).to_dict()["version"] == 2
    assert QuantConfig(w_bits=2, embed_bits=4).to_dict()["version"] == 2
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    off = QuantLinear.from_linear(lin, QuantConfig(w_bits=2))
    on = QuantLinear.from_linear(lin, QuantConfig(w_bits=2, a_bits=8))
    x = torch.randn(5, 32)
    w_hat = quantize_weight(lin.weight, off.weight_clip_val, off.scheme)
    with torch.no_grad():
        assert torch.equal(off(x), F.linear(x, w_hat, lin.bias))  # off: today's layer, bit for bit
        assert torch.equal(on(x), F.linear(fake_quantize_activation(x), w_hat, lin.bias))
        assert not torch.equal(on(x), off(x))
    assert QuantConfig.from_dict(QuantConfig(w_bits=2, a_bits=8).to_dict()).a_bits == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=2, a_bits=4), "a_bits 4 is not supported: use 8"),
    (dict(w_bits=2, embed_bits=5), "embed_bits 5 is not supported: use one of 1, 1.58, 2, 3, 4, 8"),
    (dict(w_bits=2, head_bits="x"), "head_bits 'x' is not a number"),
    (dict(w_bits=8), "w_bits 8 is not supported: use one of 1, 1.58, 2, 3, 4 "),
    (dict(w_bits=16, embed_bits=4), "apply to a quantized model: set w_bits"),
    (dict(w_bits=2, embed_bits=4, embed_group_size=0), "embed_group_size must be a positive integer"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        QuantConfig(**kwargs)


# -- the 8-bit scheme ----------------------------------------------------------------------------------------

def test_int8_scheme_is_a_symmetric_integer_grid():
    s = TABLE_SCHEMES[8]
    assert 8 not in SCHEMES  # the decoder's Linear layers keep 1…4 bits
    assert (s.qn, s.qp, s.n_levels, s.code_bits) == (-128, 127, 256, 8)
    assert s.integer_grid == (1.0, tuple(range(-128, 128)))
    w = torch.randn(6, 64)
    a = init_scale(w, s, None)
    assert torch.equal(a[:, 0], w.abs().amax(1) / 127)
    q = s.quantize_scaled(w, a)  # the normalised levels Ŵ = α̃·q is made of
    assert torch.equal(q, q.round()) and q.abs().max() == 127 and q.min() >= -128
    assert torch.equal(quantize_weight(w, a, s), q * a)
    assert (q - w / a).abs().max() <= 0.5 + 1e-5


# -- QuantEmbedding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group", [(4, 32), (8, None), (2, 16)])
def test_quant_embedding_forward_and_backward(bits, group):
    torch.manual_seed(1)
    emb = torch.nn.Embedding(40, 64)
    q = QuantEmbedding.from_embedding(emb, QuantConfig(w_bits=2, embed_bits=bits, embed_group_size=group))
    assert q.weight is emb.weight and q.weight_clip_val.shape == (40, 1 if group is None else 64 // group)
    with torch.no_grad():
        q.weight_clip_val.mul_(torch.empty_like(q.weight_clip_val).uniform_(0.6, 1.0))  # some weights clip
    ids = torch.tensor([[3, 7, 3], [0, 39, 12]])
    out = q(ids)
    w_hat = quantize_weight(q.weight, q.weight_clip_val, q.scheme)
    assert torch.equal(out, w_hat[ids])
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # the same gradients as the quantizer's backward of ∂L/∂Ŵ (rows 3 and 7 … summed), computed here by hand
    grad_w_hat = torch.zeros(40, 64).index_add_(0, ids.reshape(-1), g.reshape(-1, 64))
    gw, ga = quantize_backward(q.weight.detach(), q.weight_clip_val.detach(), q.scheme, grad_w_hat)
    torch.testing.assert_close(q.weight.grad, gw, rtol=0, atol=0)
    torch.testing.assert_close(q.weight_clip_val.grad, ga, rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(q.weight.grad[[1, 2, 4]]) == 0  # rows not looked up
    assert torch.count_nonzero(q.weight.grad[3]) > 0
    # the straight-through mask: clipped weights get no gradient (the scale was shrunk, so some clip)
    x = q.weight.detach() / q.weight_clip_val.detach().repeat_interleave(64 // q.weight_clip_val.shape[1], 1)
    outside = (x < q.scheme.lo) | (x > q.scheme.hi)
    assert outside[3].any() and (q.weight.grad[3][outside[3]] == 0).all()
    # an unquantized embedding gives another output (control)
    assert not torch.equal(emb(ids), out)


def _fixture(**qc):
    model = load_model(FIXTURE, dtype=torch.float32)
    report = quantize_model(model, QuantConfig(w_bits=2, **qc))
    with torch.no_grad():  # "trained" scales, different per row/group
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if n.endswith("weight_clip_val"):
                p.mul_(torch.empty(p.shape).uniform_(0.7, 1.1, generator=g))
    return model, report


def test_tied_embedding_is_quantized_once():
    model, report = _fixture(embed_bits=4, embed_group_size=32)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantTiedHead)
    assert report.tables == ["model.embed_tokens"]
    assert head.weight is emb.weight  # one latent weight
    scales = [n for n, _ in model.named_parameters() if n.endswith("weight_clip_val")]
    assert len(scales) == 21 + 1 and "model.embed_tokens.weight_clip_val" in scales  # one scale set, no lm_head one
    ids = torch.tensor([[5, 9, 100, 7]])
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        w_hat = quantize_weight(emb.weight, emb.weight_clip_val, emb.scheme)
        assert torch.equal(head(h), F.linear(h, w_hat))
        assert torch.equal(emb(ids), w_hat[ids])
        emb.weight_clip_val.mul_(1.5)  # the head follows the embedding's scales (control)
        assert not torch.equal(head(h), F.linear(h, w_hat))
    # both uses send their gradient to the one scale set
    model.zero_grad()
    head(h).sum().backward()
    from_head = emb.weight_clip_val.grad.clone()
    model.zero_grad()
    model(ids).logits.sum().backward()
    assert torch.count_nonzero(from_head) > 0 and not torch.equal(emb.weight_clip_val.grad, from_head)


def test_tied_model_refuses_head_bits_alone_or_different():
    model = load_model(FIXTURE, dtype=torch.float32)
    with pytest.raises(UserError, match="ties its LM head to the input embedding .* with embed_bits"):
        quantize_model(model, QuantConfig(w_bits=2, head_bits=4))
    with pytest.raises(UserError, match="head_bits 8 / head_group_size None differ from embed_bits 4"):
        quantize_model(model, QuantConfig(w_bits=2, embed_bits=4, head_bits=8))
    with pytest.raises(UserError, match="embed_group_size 48 does not divide the width 128 of model.embed_tokens"):
        quantize_model(model, QuantConfig(w_bits=2, embed_bits=4, embed_group_size=48))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # checked before anything changed
    quantize_model(model, QuantConfig(w_bits=2, embed_bits=4, head_bits=4))  # the same layout: accepted
    assert isinstance(model.lm_head, QuantTiedHead)


def test_untied_head_and_embedding_separately():
    model = tiny_llama(hidden=64, vocab=128)
    quantize_model(model, QuantConfig(w_bits=2, embed_bits=4, head_bits=8, head_group_size=32))
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantHead)
    assert model.lm_head.scheme is TABLE_SCHEMES[8] and model.lm_head.weight_clip_val.shape == (128, 2)
    assert model.model.embed_tokens.scheme is TABLE_SCHEMES[4]
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        w_hat = quantize_weight(model.lm_head.weight, model.lm_head.weight_clip_val, TABLE_SCHEMES[8])
        assert torch.equal(model(ids).logits, F.linear(h, w_hat))
    plain = dequantize_model(model)
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear


def _round_scales(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("weight_clip_val"):
                p.copy_(p.half().float())


@pytest.mark.parametrize("qc", [dict(embed_bits=4, embed_group_size=32, a_bits=8), dict(embed_bits=8),
                                dict(a_bits=8), dict(a_bits=8, a_group_size=32),
                                dict(embed_bits=4, embed_group_size=32, a_bits=8, a_group_size="gguf")])
def test_packed_round_trip_is_bit_exact_tied(tmp_path, qc):
    model, _ = _fixture(**qc)
    save_packed(model, tmp_path / "p", dtype=torch.float32)
    tensors = load_file(tmp_path / "p" / "model.safetensors")
    if "embed_bits" in qc:
        assert "model.embed_tokens.qweight" in tensors and "model.embed_tokens.weight" not in tensors
        assert not any(k.startswith("lm_head") for k in tensors)
        assert tensors["model.embed_tokens.qweight"].numel() == 512 * 128 * qc["embed_bits"] // 8
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert {k: saved[k] for k in qc} == qc
    packed = load_packed(tmp_path / "p", dtype=torch.float32)
    if "embed_bits" in qc:
        assert isinstance(packed.model.embed_tokens, PackedEmbedding) and isinstance(packed.lm_head, PackedTiedHead)
    assert all(m.a_bits == qc.get("a_bits", 16) for m in packed.modules() if hasattr(m, "a_bits"))
    want_block = {None: None, 32: 32, "gguf": 32}[qc.get("a_group_size")]  # the fixture's rows: 128, 256 wide
    assert all(m.a_block == want_block for m in packed.modules() if hasattr(m, "a_block"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    _round_scales(model)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, model(ids).logits)
        if qc.get("a_bits") == 8:  # the packed model runs the activation rounding too (control: without it)
            for m in packed.modules():
                if hasattr(m, "a_bits"):
                    m.a_bits = 16
            assert not torch.equal(packed(ids).logits, model(ids).logits)


def test_packed_round_trip_untied_and_sizes(tmp_path):
    model = tiny_llama(hidden=64, vocab=256)
    quantize_model(model, QuantConfig(w_bits=2, embed_bits=4, embed_group_size=32, head_bits=8, a_bits=8))
    save_packed(model, tmp_path / "p", dtype=torch.float32)
    packed = load_packed(tmp_path / "p", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    _round_scales(model)
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, model(ids).logits)
    t = load_file(tmp_path / "p" / "model.safetensors")
    assert t["model.embed_tokens.qweight"].numel() == 256 * 64 // 2 and t["model.embed_tokens.scales"].shape == (256, 2)
    assert t["lm_head.qweight"].numel() == 256 * 64 and t["lm_head.scales"].shape == (256, 1)
    info = folder_info(tmp_path / "p")
    assert (info["embed_bits"], info["embed_group_size"], info["head_bits"], info["a_bits"]) == (4, 32, 8, 8)
    assert "model.embed_tokens" in info["quantized_layers"] and "lm_head" in info["quantized_layers"]
    from paretoq.cli.info import format_info

    text = format_info(info)
    assert "tables       embedding 4-bit, scales per group of 32; LM head 8-bit, scales per row" in text
    assert "activations  8-bit per token" in text


def test_fake_folder_round_trip(tmp_path):
    model, _ = _fixture(embed_bits=4, embed_group_size=32, a_bits=8)
    model.save_pretrained(tmp_path / "f")
    again = load_model(tmp_path / "f", dtype=torch.float32)
    assert isinstance(again.model.embed_tokens, QuantEmbedding) and isinstance(again.lm_head, QuantTiedHead)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again.model.embed_tokens.weight_clip_val, model.model.embed_tokens.weight_clip_val)
    ids = torch.tensor([[1, 50, 300, 2]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("source", ["model", "packed"])
def test_hf_export_bakes_the_quantized_table(tmp_path, source):
    from transformers import AutoModelForCausalLM

    from paretoq.export.hf import export_hf

    model = tiny_llama(hidden=64, vocab=128)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    quantize_model(model, QuantConfig(w_bits=4, embed_bits=8, a_bits=16))
    assert isinstance(model.lm_head, QuantTiedHead)
    if source == "packed":
        _round_scales(model)
        save_packed(model, tmp_path / "p", dtype=torch.float32)
        export_hf(tmp_path / "p", tmp_path / "hf", dtype=torch.float32)
    else:
        export_hf(model, tmp_path / "hf", dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
