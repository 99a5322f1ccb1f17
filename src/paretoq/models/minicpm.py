"""MiniCPM (1, 2, 3 and 4, dense) as a native transformers model, built from transformers' Llama pieces.

SPEC §3: MiniCPM is Llama (RMSNorm, GQA attention with half-split RoPE, SiLU-gated MLP) plus three μP
scalings and LongRoPE:

1. ``h = embed(ids) * scale_emb``;
2. every layer ``h += (scale_depth / sqrt(L)) * Attn(RMSNorm(h))`` and the same for the MLP branch;
3. ``logits = lm_head(RMSNorm(h) / (hidden_size / dim_model_base))``, returned in fp32;
4. loss: transformers' ``ForCausalLMLoss`` (shifted mean cross-entropy, ignore -100, exact with
   ``num_items_in_batch`` under gradient accumulation).

LongRoPE (``rope_scaling.rope_type == "longrope"``) as in the official MiniCPM code: angle_i = t * inv_freq_i / f_i
with inv_freq_i = theta^(-2i/d), f = long_factor when the (cached) length exceeds
``original_max_position_embeddings`` and short_factor otherwise; cos and sin are multiplied by
sqrt(1 + ln(max_pos / orig) / ln(orig)).  Two documented departures from the official code, both invisible for a
single forward on a fresh model (which is what ``fixtures/minicpm4-tiny`` records):

- the official rotary cache is *sticky*: once a sequence longer than ``original_max_position_embeddings`` has been
  seen, every later call uses the long factors.  Here the choice is made per forward from the positions it sees
  (long iff max(position_ids) + 1 > orig, or always long when max_position_embeddings > orig, which is what the
  official cache built at init does);
- with a KV cache, the official code keeps the keys already cached with short-factor angles when decoding crosses
  ``orig``.  ``generate`` here drops the cache at that one step and re-encodes the prompt with the long factors (the
  approach transformers takes for Phi-3), so cached decoding equals decoding by full recomputation.

MiniCPM4-8B's ``sparse_config`` (InfLLM v2 block-sparse attention) is accepted and ignored: attention is dense,
which equals the official model for sequences up to ``sparse_config["dense_len"]`` tokens.  The official code
applies RoPE in fp32 even under bf16; here it follows Llama (compute dtype), which matters only in bf16.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
)

from paretoq.models.minicpm_config import MiniCPMConfig

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


class MiniCPMRotaryEmbedding(nn.Module):
    """Plain RoPE or MiniCPM LongRoPE (SPEC §3); returns (cos, sin) of shape (batch, seq, head_dim).

    The angle is computed in the official order of operations, ``(t * (1 / f)) * inv_freq``, so fp32 angles round
    as the official ones do.
    """

    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        params = config.rope_parameters
        self.config = config
        self.longrope = params.get("rope_type") == "longrope"
        self.attention_scaling = 1.0
        self.original_max = self.always_long = None
        if self.longrope:
            self.original_max = params["original_max_position_embeddings"]
            scale = config.max_position_embeddings / self.original_max
            self.attention_scaling = math.sqrt(1 + math.log(scale) / math.log(self.original_max))
            self.always_long = config.max_position_embeddings > self.original_max
        for name, value in self.tables().items():
            self.register_buffer(name, value, persistent=False)

    def tables(self) -> dict[str, torch.Tensor]:
        """inv_freq_i = theta^(-2i/d) and the reciprocal short/long factors (ones for plain RoPE)."""
        params, dim = self.config.rope_parameters, self.config.head_dim
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
        ones = [1.0] * (dim // 2)
        short = torch.tensor(params.get("short_factor", ones), dtype=torch.float32)
        long = torch.tensor(params.get("long_factor", ones), dtype=torch.float32)
        return {"inv_freq": inv_freq, "short_inv_factor": 1.0 / short, "long_inv_factor": 1.0 / long}

    def uses_long_factors(self, seq_len: int) -> bool:
        """Whether a sequence of ``seq_len`` positions is rotated with the long factors."""
        return bool(self.longrope and (self.always_long or seq_len > self.original_max))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_factor = self.short_inv_factor
        if self.longrope:
            use_long = (position_ids.max() + 1 > self.original_max) | self.always_long
            inv_factor = torch.where(use_long, self.long_inv_factor, self.short_inv_factor)
        freqs = (position_ids[..., None].float() * inv_factor) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class MiniCPMDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer whose two residual branches are scaled by scale_depth / sqrt(num_layers) (SPEC §3.2)."""

    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out * self.residual_scale
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + mlp_out * self.residual_scale


class MiniCPMPreTrainedModel(LlamaPreTrainedModel):
    config_class = MiniCPMConfig
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _can_record_outputs = {"hidden_states": MiniCPMDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MiniCPMRotaryEmbedding):  # non-persistent buffers leave the meta device here
            for name, value in module.tables().items():
                init.copy_(getattr(module, name), value)


class MiniCPMModel(MiniCPMPreTrainedModel, LlamaModel):
    """LlamaModel with MiniCPM layers and rotary embedding; embeddings scaled by ``scale_emb`` (SPEC §3.1).

    ``last_hidden_state`` is the final RMSNorm output, as in the official ``MiniCPMModel``.
    """

    def __init__(self, config: MiniCPMConfig):
        MiniCPMPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MiniCPMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        if config.sparse_config:
            _warn_once(
                "sparse_config",
                "MiniCPM sparse_config (InfLLM v2 sparse attention) is not implemented: running dense attention, "
                "which equals the official model up to sparse_config['dense_len'] tokens.",
            )
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb
            input_ids = None
        return LlamaModel.forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel, GenerationMixin):
    """MiniCPM language model: logits = lm_head(h / (hidden_size / dim_model_base)) in fp32 (SPEC §3.3–4)."""

    _tied_weights_keys = LlamaForCausalLM._tied_weights_keys
    _tp_plan = LlamaForCausalLM._tp_plan
    _pp_plan = LlamaForCausalLM._pp_plan

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, input_ids, cache=None, **kwargs):
        """Re-encode everything at the one step where decoding crosses into the long LongRoPE factors.

        Cached keys were rotated with the short factors; recomputing them keeps ``generate`` equal to greedy decoding
        by full recomputation (the official code keeps the stale keys instead; see the module docstring).
        """
        rotary = self.model.rotary_emb
        if cache is not None and rotary.uses_long_factors(input_ids.shape[1]):
            past = cache.get_seq_length()
            if 0 < past and not rotary.uses_long_factors(past):
                cache = None
                kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)


def as_llama(config: MiniCPMConfig, state: dict[str, torch.Tensor]) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The same network as a plain ``LlamaForCausalLM``: its config and state dict (fp32 in, fp32 out).

    The three μP scalings are constants, so they fold into weights that follow them linearly:
    embeddings × scale_emb; ``o_proj`` and ``down_proj`` (weight and bias) × scale_depth/√L; the LM
    head ÷ (hidden_size/dim_model_base), which unties it from the (now scaled) embedding. LongRoPE
    becomes transformers' own ``longrope`` rope type (the same angles, switch point and cos/sin
    scale); where MiniCPM always rotates with the long factors (max_position_embeddings >
    original_max_position_embeddings) both factor lists are the long ones. The outputs equal
    MiniCPM's up to the rounding of the folded products and of the angles.
    """
    d = config.to_dict()
    for key in ("scale_emb", "dim_model_base", "scale_depth", "sparse_config", "model_type", "architectures",
                "auto_map", "rope_scaling", "transformers_version"):
        d.pop(key, None)
    rope = dict(config.rope_parameters)
    if rope.get("rope_type") == "longrope":
        orig = rope["original_max_position_embeddings"]
        rope["factor"] = config.max_position_embeddings / orig
        if config.max_position_embeddings > orig:
            rope["short_factor"] = list(rope["long_factor"])
    llama = LlamaConfig(**{**d, "rope_parameters": rope, "tie_word_embeddings": False})
    residual = config.scale_depth / math.sqrt(config.num_hidden_layers)
    out = dict(state)
    embed = state["model.embed_tokens.weight"]
    out["model.embed_tokens.weight"] = embed * config.scale_emb
    out["lm_head.weight"] = state.get("lm_head.weight", embed) / (config.hidden_size / config.dim_model_base)
    for key, tensor in state.items():
        if key.endswith(("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight",
                         "mlp.down_proj.bias")):
            out[key] = tensor * residual
    return llama, out


__all__ = ["MiniCPMConfig", "MiniCPMModel", "MiniCPMForCausalLM", "MiniCPMPreTrainedModel", "as_llama"]
