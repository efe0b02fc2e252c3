# Copyright (c) hfpatch contributors. Licensed under the Apache License, Version 2.0.
"""Baichuan2 (7B, RoPE) configuration: a first-party port for transformers 5.17.

Reads the official ``baichuan-inc/Baichuan2-7B-Base`` ``config.json`` unchanged;
keys this port has no use for (``model_max_length``, ``tokenizer_class``...) are kept
as plain attributes. The 13B model's ALiBi variant is not covered.
"""

from huggingface_hub.dataclasses import strict

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class BaichuanConfig(PreTrainedConfig):
    r"""Configuration of a Baichuan2-7B-style decoder (defaults: Baichuan2-7B-Base).

    Args:
        vocab_size: vocabulary size (``embed_tokens`` / ``lm_head`` rows).
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU feed-forward.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: attention heads (multi-head: keys and values have as many).
        hidden_act: feed-forward activation.
        max_position_embeddings: longest sequence the RoPE tables assume.
        initializer_range: std of the default weight initialisation.
        rms_norm_eps: RMSNorm epsilon.
        z_loss_weight: weight of Baichuan2's max-logit penalty (mean squared max logit) added to the loss
            when labels are given; 0 (the released models) adds nothing.
        rope_parameters: transformers' RoPE dict; ``rope_theta`` 10000 unless given.
        attention_dropout: dropout on attention probabilities (training only).
    """

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 125696
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    z_loss_weight: int | float = 0.0
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: int | float | None = 0.0

    def validate_architecture(self):
        """Part of `@strict` validation: ``W_pack`` splits the width into whole heads."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads})"
            )


__all__ = ["BaichuanConfig"]
