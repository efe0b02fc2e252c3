# Copyright (c) hfpatch contributors. Licensed under the Apache License, Version 2.0.
"""InternLM2 configuration: a first-party port for transformers 5.17.

Reads the official ``internlm/internlm2-7b`` ``config.json`` unchanged: the hub's
keys (``bias``, ``rope_theta``, legacy ``rope_scaling`` = ``{"type", "factor"}``,
``pretraining_tp``, ``attn_implementation``) are accepted; ``rope_theta`` and
``rope_scaling`` are folded into transformers' ``rope_parameters``.
"""

from huggingface_hub.dataclasses import strict

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class InternLM2Config(PreTrainedConfig):
    r"""Configuration of an InternLM2 decoder (defaults: InternLM2-7B's shape before its config.json).

    Args:
        vocab_size: vocabulary size (``tok_embeddings`` / ``output`` rows).
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU feed-forward (``w1``/``w3`` outputs, ``w2`` input).
        num_hidden_layers: number of decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA); ``None`` means ``num_attention_heads``.
        hidden_act: feed-forward activation.
        max_position_embeddings: longest sequence the RoPE tables (and dynamic scaling) assume.
        initializer_range: std of the default weight initialisation.
        rms_norm_eps: RMSNorm epsilon.
        bias: bias on ``wqkv`` and ``wo`` (the feed-forward never has one).
        pretraining_tp: accepted for config.json compatibility; the split matmul it selects in the hub
            code is the same product, so it does not change this model.
        rope_parameters: transformers' RoPE dict; built from ``rope_theta`` / ``rope_scaling`` when those are given.
        attention_dropout: dropout on attention probabilities (training only).
    """

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_pp_plan = {
        "tok_embeddings": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    base_model_fsdp_plan = {
        "tok_embeddings": "free_full_weight",
        "layers.*": "free_full_weight",
        "norm": "keep_full_weight",
    }

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    bias: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: int | float | None = 0.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation: the packed ``wqkv`` needs whole heads and whole query groups."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


__all__ = ["InternLM2Config"]
