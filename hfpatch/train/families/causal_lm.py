"""Causal language models (decoder-lm, decoder-moe, state-space): packed or padded text, the causal LM loss."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..batches import packed_micro_batch, padded_micro_batch, step_stats
from ..build import check_checkpoint_vocab, check_heads, check_override_keys, checkpoint_config, tiny_config
from ..config import TrainConfig
from ..data import check_vocab, load_dataset
from ..errors import DataError
from .base import Family, Workload, transformers_flops_shape, transformers_head_dim


class CausalLM(Family):
    name = "causal LM"
    manifest_families = ("decoder-lm", "decoder-moe", "state-space")

    def model_config(self, entry, cfg: TrainConfig, vocab_size: int | None, special_ids: Mapping[str, int | None] | None = None):
        """``special_ids`` (bos/eos/pad token ids of the run's tokenizer) replace the tiny config's placeholders,
        so an exported model generates with the right stop token."""
        overrides = cfg.model_overrides
        if cfg.model_path:
            config = checkpoint_config(entry, cfg, overrides)
            check_checkpoint_vocab(vocab_size, config.vocab_size, "vocab_size", cfg.model_path)
        else:
            check_override_keys(tiny_config(entry), overrides, f"{entry.name} tiny")
            values: dict[str, Any] = dict(special_ids or {})
            if vocab_size is not None:
                values["vocab_size"] = vocab_size
            # Overrides go through the constructor so derived fields (head_dim...) follow them.
            values.update(overrides)
            # Positions restart in every document, so seq_len bounds them.
            values.setdefault("max_position_embeddings", max(entry.test_config.get("max_position_embeddings", 0), cfg.seq_len))
            config = tiny_config(entry, **values)
            if vocab_size is not None and vocab_size > config.vocab_size:
                raise DataError(f"the tokenizer has {vocab_size} tokens but model.vocab_size={config.vocab_size}; "
                                f"raise model.vocab_size or drop the override")
        check_heads(config, cfg.sp)
        config.use_cache = False
        return config

    def load(self, entry, cfg: TrainConfig, rank: int, dtype: torch.dtype) -> Workload:
        tokenizer, dataset, source = load_dataset(cfg, rank)
        config = self.model_config(entry, cfg, tokenizer.vocab_size, tokenizer.special_ids)
        check_vocab(dataset, config.vocab_size, source)
        make = packed_micro_batch if cfg.packed else padded_micro_batch
        return Workload(
            dataset=dataset, source=source, tokenizer=tokenizer, tokenizer_source=tokenizer.source, config=config,
            stats=step_stats, micro_batch=lambda rows, sp_rank, sp, seed: make(rows, sp_rank, sp, tokenizer.pad_id),
        )

    def describe_config(self, config) -> str:
        return f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"

    def flops_shape(self, config) -> tuple[int, int]:
        return transformers_flops_shape(config)

    def head_dim(self, config) -> int:
        return transformers_head_dim(config)
