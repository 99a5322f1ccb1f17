"""GGUF token_embd / output of quantized embeddings and LM heads (embed_bits / head_bits): Q4_0, Q8_0."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import FIXTURE, tiny_llama
from paretoq import QuantConfig, quantize_model, save_packed
from paretoq.errors import UserError
from paretoq.export.gguf import export_gguf
from paretoq.loading import load_model
from paretoq.quant.functional import SCALE_EPS

FP16_HALF_ULP = 2.0 ** -11


def _tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def _check(module, got):
    """The gguf package's dequantization = d·k (d = fp16(α̃)) exactly, and Ŵ within fp16 scale rounding."""
    w_hat = module.quantized_weight().detach().double()
    alpha = module.weight_clip_val.detach().double().clamp_min(SCALE_EPS)
    step, _ = module.scheme.integer_grid
    a = alpha.repeat_interleave(module.in_features // alpha.shape[1], dim=1) * step
    k = torch.round(w_hat / a)
    exact = k.numpy().astype(np.float32) * a.numpy().astype(np.float16).astype(np.float32)
    assert np.array_equal(got, exact)
    w_hat = w_hat.float().numpy()
    assert (np.abs(got - w_hat) <= FP16_HALF_ULP * np.abs(w_hat) + 1e-12).all()
    return w_hat


def _minicpm(**qc):
    model = load_model(FIXTURE, dtype=torch.float32)
    quantize_model(model, QuantConfig(w_bits=2, **qc))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        e = model.model.embed_tokens.weight_clip_val
        e.mul_(torch.empty(e.shape).uniform_(0.7, 1.1, generator=g))
    return model


@pytest.mark.parametrize("bits, group, qtype", [(4, 32, "Q4_0"), (4, None, "Q4_0"), (8, 32, "Q8_0"),
                                                (8, None, "Q8_0"), (2, 64, "Q4_0")])
def test_tied_embedding_is_exact_q4_0_or_q8_0(tmp_path, bits, group, qtype):
    model = _minicpm(embed_bits=bits, embed_group_size=group)
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=FIXTURE))
    got_type, got = _tensor(reader, "token_embd.weight")
    assert got_type == qtype
    w_hat = _check(model.model.embed_tokens, got)
    assert not any(t.name == "output.weight" for t in reader.tensors)  # tied: llama.cpp reuses token_embd
    assert reader.fields["paretoq.embed_bits"].contents() == bits
    # control: the unquantized latent table is not what the file holds
    assert not np.allclose(got, model.model.embed_tokens.weight.detach().numpy(), rtol=0, atol=1e-6)
    assert np.abs(got - w_hat).max() > 0 or bits == 8  # fp16 scale rounding shows somewhere (4-bit)


def test_packed_folder_exports_the_same_table(tmp_path):
    model = _minicpm(embed_bits=4, embed_group_size=32)
    save_packed(model, tmp_path / "p")
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / f, tmp_path / "p" / f)
    with torch.no_grad():  # the packed codes come from the fp16-rounded scales: the same model
        model.model.embed_tokens.weight_clip_val.copy_(model.model.embed_tokens.weight_clip_val.half().float())
    a = _tensor(gguf.GGUFReader(export_gguf(model, tmp_path / "a.gguf", tokenizer=FIXTURE)), "token_embd.weight")
    b = _tensor(gguf.GGUFReader(export_gguf(tmp_path / "p", tmp_path / "b.gguf")), "token_embd.weight")
    assert a[0] == b[0] == "Q4_0" and np.array_equal(a[1], b[1])


def test_untied_head_is_output_q8_0(tmp_path):
    model = tiny_llama(layers=1, hidden=64, vocab=512, seed=2)
    quantize_model(model, QuantConfig(w_bits=4, embed_bits=4, embed_group_size=32, head_bits=8))
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=FIXTURE))
    t_emb, emb = _tensor(reader, "token_embd.weight")
    t_out, out = _tensor(reader, "output.weight")
    assert (t_emb, t_out) == ("Q4_0", "Q8_0")
    _check(model.model.embed_tokens, emb)
    _check(model.lm_head, out)


def test_table_not_aligned_to_32_is_refused_or_f16(tmp_path):
    model = _minicpm(embed_bits=4, embed_group_size=16)
    with pytest.raises(UserError, match=r"model.embed_tokens \(4-bit, group_size 16, width 128\) fits neither Q4_0 "
                                        r"nor Q8_0 exactly.*--embed_group_size / --head_group_size 32"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=FIXTURE)
    assert not (tmp_path / "m.gguf").exists()
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=FIXTURE, fallback="f16"))
    got_type, got = _tensor(reader, "token_embd.weight")
    assert got_type == "F16"
    w_hat = model.model.embed_tokens.quantized_weight().detach().numpy()
    assert np.abs(got - w_hat).max() <= FP16_HALF_ULP * np.abs(w_hat).max()
