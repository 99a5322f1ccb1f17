"""MiniCPM as a native transformers model (SPEC §3) against fixtures/minicpm4-tiny (official code, fp32, eager)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig, LlamaForCausalLM

import paretoq.models  # noqa: F401  (registers "minicpm")
from conftest import LOGITS_ATOL, LOSS_ATOL, MINICPM_BITS, assert_quantized_minicpm_matches_official
from paretoq import QuantConfig, quantize_model
from paretoq.models import minicpm
from paretoq.models.minicpm import MiniCPMConfig, MiniCPMForCausalLM


def load(folder, attn="eager", **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32, **kwargs).eval()


def small_config(**overrides) -> MiniCPMConfig:
    args = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32, scale_emb=12, dim_model_base=16, scale_depth=1.4)
    return MiniCPMConfig(**{**args, **overrides})


# --- full precision against the official code --------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("which", ["short", "long"])  # 40 ≤ 64 = orig → short factors; 80 > 64 → long factors
def test_logits_match_official(fixture_dir, ref, attn, which):
    model = load(fixture_dir, attn)
    assert isinstance(model, MiniCPMForCausalLM) and model.config._attn_implementation == attn
    with torch.no_grad():
        logits = model(ref[f"input_ids_{which}"], use_cache=False).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref[f"logits_fp_{which}"], atol=LOGITS_ATOL, rtol=0)


def test_long_factors_matter(fixture_dir, ref):
    """Rotating the 80-token input with the short factors would miss the reference by far more than the tolerance."""
    model = load(fixture_dir)
    rotary = model.model.rotary_emb
    rotary.long_inv_factor.copy_(rotary.short_inv_factor)
    with torch.no_grad():
        logits = model(ref["input_ids_long"], use_cache=False).logits
    assert (logits - ref["logits_fp_long"]).abs().max() > 100 * LOGITS_ATOL


# --- the ParetoQ quantizers on MiniCPM, against the reference implementation ------------------------------------


@pytest.mark.parametrize("tag", list(MINICPM_BITS))
def test_quantized_matches_reference(fixture_dir, ref, tag):
    model = load(fixture_dir)
    quantize_model(model, QuantConfig(w_bits=MINICPM_BITS[tag]))
    assert_quantized_minicpm_matches_official(model, ref, tag)


@pytest.mark.parametrize("tag", list(MINICPM_BITS))
def test_wrong_rms_norm_eps_fails_the_official_comparison(fixture_dir, ref, tag):
    """Negative control: RMSNorm's ε 1e-5 instead of the config's 1e-6 (logits off by 1.1–2.3e-5, gradients by
    5.4–8.7e-5 relative) must fail the tolerances the test above holds the faithful model to."""
    model = load(fixture_dir, rms_norm_eps=1e-5)
    assert model.model.norm.variance_epsilon == 1e-5
    quantize_model(model, QuantConfig(w_bits=MINICPM_BITS[tag]))
    with pytest.raises(AssertionError):
        assert_quantized_minicpm_matches_official(model, ref, tag)


def test_quantize_tiny_llama():
    """The same call swaps exactly the 7 projections per layer of a plain Llama and leaves lm_head alone."""
    from paretoq import QuantConfig, QuantLinear, quantize_model

    torch.manual_seed(0)
    layers = 2
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2))
    head = model.lm_head.weight.detach().clone()
    quantize_model(model, QuantConfig(w_bits=2))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * layers
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, head)
    assert all(".layers." in n for n in quantized)
    assert torch.isfinite(model(torch.arange(10)[None]).logits).all()


# --- generation, serialisation, training plumbing ---------------------------------------------------------------


def test_generate_with_cache_equals_full_recomputation(fixture_dir, ref, monkeypatch):
    """Greedy decoding from 40 to 80 tokens crosses orig = 64, where LongRoPE switches to the long factors.

    The official code would keep the short-rotated cached keys at that step; ``generate`` here re-encodes the
    sequence once instead, so every step's logits equal a full forward over the sequence so far.
    """
    model = load(fixture_dir, "sdpa")
    model.generation_config.eos_token_id = None
    prompt = ref["input_ids_short"]
    new = 40
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True,
                             return_dict_in_generate=True, output_logits=True)
        seq = prompt
        for step in range(new):
            logits = model(seq, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=LOGITS_ATOL, rtol=0, msg=f"step {step}")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert seq.shape[1] == 80 > model.config.rope_scaling["original_max_position_embeddings"]
    assert torch.equal(out.sequences, seq)

    # What the official code does: keep the short-rotated keys when crossing 64 -> logits off from step 25 on.
    monkeypatch.setattr(MiniCPMForCausalLM, "prepare_inputs_for_generation",
                        GenerationMixin.prepare_inputs_for_generation)
    with torch.no_grad():
        stale = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True,
                               return_dict_in_generate=True, output_logits=True)
    assert torch.equal(stale.logits[24], out.logits[24])
    assert (stale.logits[25] - out.logits[25]).abs().max() > 1e-2


def test_save_pretrained_round_trip(fixture_dir, ref, tmp_path):
    model = load(fixture_dir)
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    original = json.loads((fixture_dir / "config.json").read_text())
    assert saved["rope_scaling"] == original["rope_scaling"] and saved["rope_theta"] == original["rope_theta"]
    assert "rope_parameters" not in saved
    for key in ("scale_emb", "dim_model_base", "scale_depth", "tie_word_embeddings", "max_position_embeddings"):
        assert saved[key] == original[key], key
    assert "lm_head.weight" not in load_file(str(tmp_path / "a" / "model.safetensors"))  # tied, as official
    again = load(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()
    with torch.no_grad():
        for which in ("short", "long"):
            ids = ref[f"input_ids_{which}"]
            assert torch.equal(again(ids).logits, model(ids).logits)


def test_auto_map_to_remote_code_is_ignored(fixture_dir, ref, tmp_path):
    folder = tmp_path / "with_auto_map"
    shutil.copytree(fixture_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                          "AutoModel": "modeling_minicpm.MiniCPMModel",
                          "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))  # no .py files: using them would fail
    for trust in (None, True):
        kwargs = {} if trust is None else {"trust_remote_code": trust}
        assert type(AutoConfig.from_pretrained(folder, **kwargs)) is MiniCPMConfig
        model = load(folder, **kwargs)
        assert type(model) is MiniCPMForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids_short"]).logits, ref["logits_fp_short"], atol=LOGITS_ATOL,
                                   rtol=0)
    model.save_pretrained(tmp_path / "saved")
    assert "auto_map" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_gradient_checkpointing_same_grads(fixture_dir, ref):
    model = load(fixture_dir).train()
    ids = ref["input_ids_short"]

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) == 3  # forward once more inside backward: the layer was checkpointed
    assert plain.keys() == checkpointed.keys() and len(plain) == 3 * 9 + 2
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-6, msg=name)


def test_loss_with_num_items_in_batch(fixture_dir, ref):
    """Under gradient accumulation the Trainer passes num_items_in_batch: loss = sum CE / num_items."""
    model = load(fixture_dir)
    ids = ref["input_ids_short"]
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, 30:] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        shift_logits, shift_labels = out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1)
        ce_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        count = (shift_labels != -100).sum()
        torch.testing.assert_close(out.loss, ce_sum / count, atol=LOSS_ATOL, rtol=0)
        accumulated = model(ids, labels=labels, num_items_in_batch=3 * count).loss
    torch.testing.assert_close(accumulated, ce_sum / (3 * count), atol=LOSS_ATOL, rtol=0)


# --- other MiniCPM configs ---------------------------------------------------------------------------------------


def test_plain_rope_minicpm_without_mup_is_llama():
    """MiniCPM 1/2 configs carry no rope_scaling (plain RoPE); with neutral μP settings the model is exactly Llama."""
    layers = 2
    config = small_config(scale_emb=1, dim_model_base=64, scale_depth=math.sqrt(layers), tie_word_embeddings=False)
    assert config.rope_scaling is None
    torch.manual_seed(0)
    minicpm_model = MiniCPMForCausalLM(config).eval()
    llama_args = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                  "max_position_embeddings", "rms_norm_eps")}
    llama = LlamaForCausalLM(LlamaConfig(**llama_args)).eval()
    llama.load_state_dict(minicpm_model.state_dict())
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(minicpm_model(ids).logits, llama(ids).logits, atol=1e-6, rtol=0)
        muP = MiniCPMForCausalLM(small_config(tie_word_embeddings=False)).eval()
        muP.load_state_dict(minicpm_model.state_dict())
        assert (muP(ids).logits - llama(ids).logits).abs().max() > 1e-2  # the scalings do act


def test_sparse_config_runs_dense_and_warns_once(caplog):
    """MiniCPM4-8B's sparse_config is accepted; attention stays dense and one warning says so."""
    sparse = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
              "topk": 64, "use_nope": False, "dense_len": 8192}
    factors = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
               "original_max_position_embeddings": 32}
    config = small_config(sparse_config=sparse, rope_scaling=factors)
    minicpm._warned.discard("sparse_config")
    ids = torch.randint(0, 96, (1, 12))
    with caplog.at_level(logging.WARNING, logger=minicpm.__name__):
        torch.manual_seed(0)
        sparse_model = MiniCPMForCausalLM(config).eval()
        MiniCPMForCausalLM(config)
    assert sum("sparse_config" in r.getMessage() for r in caplog.records) == 1
    torch.manual_seed(0)
    dense_model = MiniCPMForCausalLM(small_config(rope_scaling=factors)).eval()
    with torch.no_grad():
        assert torch.equal(sparse_model(ids).logits, dense_model(ids).logits)
    assert config.rope_scaling == factors and config.to_dict()["sparse_config"] == sparse


def test_longrope_formula():
    """cos/sin = cos/sin(t / f_i * theta^(-2i/d)) * sqrt(1 + ln(max_pos/orig)/ln(orig)); f = long iff length > orig.

    With max_position_embeddings > orig the official cache is built with the long factors at init, so every length
    uses them; with max_position_embeddings == orig (all MiniCPM4 releases) the switch is at orig.
    """
    short, long = [1.0 + i / 8 for i in range(8)], [2.0 + i for i in range(8)]
    factors = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
               "original_max_position_embeddings": 16}
    d, theta = 16, 10000.0
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)

    def expected(t, f, scale):
        angle = torch.arange(t, dtype=torch.float64)[:, None] / torch.tensor(f, dtype=torch.float64) * inv_freq
        angle = torch.cat([angle, angle], dim=-1)
        return (angle.cos() * scale).float(), (angle.sin() * scale).float()

    for max_pos, length, f in [(16, 16, short), (16, 17, long), (64, 5, long)]:
        config = small_config(rope_scaling=factors, max_position_embeddings=max_pos)
        rotary = MiniCPMForCausalLM(config).model.rotary_emb
        scale = math.sqrt(1 + math.log(max_pos / 16) / math.log(16))
        cos, sin = rotary(torch.zeros(1), torch.arange(length)[None])
        exp_cos, exp_sin = expected(length, f, scale)
        torch.testing.assert_close(cos[0], exp_cos, atol=2e-6, rtol=0)
        torch.testing.assert_close(sin[0], exp_sin, atol=2e-6, rtol=0)


def test_real_minicpm4_config_builds():
    """A MiniCPM4-0.5B config.json as published (auto_map, eos list, mup_denominator, ...) gives SPEC §3's model."""
    real = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
            "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                         "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
            "bos_token_id": 1, "eos_token_id": [2, 73440], "pad_token_id": 2, "hidden_act": "silu",
            "hidden_size": 1024, "initializer_range": 0.1, "intermediate_size": 4096,
            "max_position_embeddings": 32768, "num_attention_heads": 16, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
            "rope_scaling": {"rope_type": "longrope", "long_factor": [1.5] * 32, "short_factor": [1.1] * 32,
                             "original_max_position_embeddings": 32768},
            "use_cache": True, "vocab_size": 73448, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
            "tie_word_embeddings": True, "mup_denominator": 32}
    config = MiniCPMConfig(**real)
    assert config.head_dim == 64 and config.rope_scaling == real["rope_scaling"] and config.mup_denominator == 32
    assert "auto_map" not in config.to_dict()
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    projections = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert total == 433_873_920 and round(projections / total, 3) == 0.827
    assert model.model.rotary_emb.attention_scaling == 1.0 and not model.model.rotary_emb.uses_long_factors(32768)


def test_rope_scaling_attribute():
    """``config.rope_scaling`` reads and writes the config.json entry (old ``type`` spelling too); others refused."""
    factors = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
               "original_max_position_embeddings": 16}
    config = small_config(rope_scaling=factors)
    assert config.rope_parameters["rope_type"] == "longrope" and config.rope_parameters["rope_theta"] == 10000.0
    assert MiniCPMForCausalLM(config).model.rotary_emb.longrope
    config.rope_scaling = None
    assert config.rope_scaling is None and config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="short_factor has 3 entries"):
        config.rope_scaling = {**factors, "short_factor": [1.0] * 3}
    with pytest.raises(ValueError, match="'yarn'"):
        small_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
