"""``MiniCPMConfig``: the configuration of MiniCPM (model_type "minicpm"), in a module of its own so that
registering it with ``AutoConfig`` does not import the modeling code (``minicpm.py``)."""

from __future__ import annotations

from transformers.models.llama.configuration_llama import LlamaConfig


class MiniCPMConfig(LlamaConfig):
    """Configuration of a MiniCPM model; reads a MiniCPM ``config.json`` as it is (SPEC §3).

    Adds to ``LlamaConfig``: ``scale_emb``, ``dim_model_base``, ``scale_depth`` (the μP scalings, with the defaults
    of the official MiniCPMConfig) and ``sparse_config`` (MiniCPM4-8B; accepted, attention stays dense).
    ``rope_scaling`` stays readable as the checkpoint spells it (``None`` for plain RoPE) and is what
    ``save_pretrained`` writes, next to ``rope_theta``, so saved folders keep the official layout.  An ``auto_map``
    pointing at remote code is dropped: the classes here replace it, and a saved folder has no code to point at.
    """

    model_type = "minicpm"

    scale_emb: int | float = 1
    dim_model_base: int | float = 1
    scale_depth: int | float = 1.0
    sparse_config: dict | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        kwargs.pop("auto_map", None)
        if isinstance(kwargs.get("rope_scaling"), dict):  # standardisation edits it in place: not the caller's dict
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = dict(self.rope_parameters)
        super().__post_init__(**kwargs)
        self._check_rope_type()

    def _check_rope_type(self) -> None:
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", "longrope"):
            raise ValueError(
                f"MiniCPMConfig supports rope_scaling rope_type 'longrope' or no rope_scaling, got {rope_type!r}"
            )

    @property
    def rope_scaling(self) -> dict | None:
        """config.json's ``rope_scaling``: ``rope_parameters`` without ``rope_theta``; None for plain RoPE."""
        params = dict(self.rope_parameters or {})
        params.pop("rope_theta", None)
        if params.get("rope_type", "default") == "default" and set(params) <= {"rope_type", "type"}:
            return None
        return params

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        theta = (self.rope_parameters or {}).get("rope_theta", self.default_theta)
        self.rope_parameters = {**(value or {}), "rope_theta": theta}
        self.standardize_rope_params()
        self._check_rope_type()
        self.validate_rope()

    def _validate_longrope_rope_parameters(self, rope_parameters, ignore_keys=None) -> None:
        """MiniCPM's LongRoPE takes its scale from max_pos / orig (no ``factor`` key): check only what it reads."""
        missing = {"short_factor", "long_factor", "original_max_position_embeddings"} - set(rope_parameters)
        if missing:
            raise ValueError(f"rope_scaling of type 'longrope' lacks {sorted(missing)}")
        half = self.head_dim // 2
        for key in ("short_factor", "long_factor"):
            if len(rope_parameters[key]) != half:
                raise ValueError(f"rope_scaling.{key} has {len(rope_parameters[key])} entries, head_dim/2 = {half}")

    def to_dict(self) -> dict:
        out = super().to_dict()
        params = out.pop("rope_parameters", None) or {}
        out["rope_theta"] = params.get("rope_theta", self.default_theta)
        out["rope_scaling"] = self.rope_scaling
        return out
