"""Flux (diffusion-transformer): packed variable-resolution latents with their text embeddings, flow matching."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import diffusion, flux_data
from ..build import check_heads, check_override_keys, model_class, pretrained_diffusers_config, tiny_config
from ..config import TrainConfig
from ..errors import ConfigError
from ..export import diffusers_stock_model
from .base import SYNTHETIC_SAMPLES, Family, Workload


class _Heads:
    def __init__(self, heads: int) -> None:
        self.num_attention_heads = heads


class Flux(Family):
    """Its config is diffusers' plain dict; its synthetic latents follow whatever config the model has."""

    name = "Flux"
    trains_padded = False
    manifest_families = ("diffusion-transformer",)

    def check_supported(self, entry, cfg: TrainConfig) -> None:
        super().check_supported(entry, cfg)
        if cfg.loss_chunk:
            raise ConfigError(f"--loss-chunk is not supported for {entry.name} ({entry.family}): "
                              f"its loss is flow matching, not a language-model loss")
        if cfg.tokenizer_path:
            raise ConfigError(f"--tokenizer is not supported for {entry.name} ({entry.family}); "
                              f"it trains on precomputed text embeddings (prompt_embeds in the --data files)")

    def model_config(self, entry, cfg: TrainConfig, vocab_size: int | None, special_ids: Mapping[str, int | None] | None = None):
        values = dict(cfg.model_overrides)
        if cfg.model_path:
            if values:
                raise ConfigError(f"model.* settings are not taken with --model-path for {entry.name}: "
                                  f"the checkpoint's config.json defines the model")
            config = pretrained_diffusers_config(model_class(entry), cfg.model_path)
        else:
            check_override_keys(tiny_config(entry), values, f"{entry.name} tiny")
            config = tiny_config(entry, **values)
        check_heads(_Heads(config["num_attention_heads"]), cfg.sp)
        return config

    def load(self, entry, cfg: TrainConfig, rank: int, dtype: torch.dtype) -> Workload:
        config = self.model_config(entry, cfg, vocab_size=None)
        if cfg.data_path:
            samples, source = flux_data.read_latents(cfg.data_path, config, cfg.seq_len), str(cfg.data_path)
        else:
            samples = diffusion.synthetic_latents(config, count=SYNTHETIC_SAMPLES, seq_len=cfg.seq_len, seed=cfg.seed)
            source = "the embedded synthetic latents"
        dataset = diffusion.pack_latents(samples, cfg.seq_len)
        return Workload(
            dataset=dataset, source=source, tokenizer=None, tokenizer_source="none (text embeddings given)",
            config=config, stats=lambda rows: diffusion.flux_stats(rows, cfg.seq_len),
            micro_batch=lambda rows, sp_rank, sp, seed: diffusion.flux_micro_batch(rows, sp_rank, sp, noise_seed=seed),
            loss=lambda model, batch, num_targets, device: diffusion.flux_loss(model, batch, num_targets, device, dtype),
        )

    def describe_config(self, config) -> str:
        return (f"{config['num_layers']} double + {config['num_single_layers']} single blocks, "
                f"{config['num_attention_heads']} x {config['attention_head_dim']} heads")

    def flops_shape(self, config) -> tuple[int, int]:
        """Flux's attention is non-causal: each layer counts twice a causal one."""
        return 2 * (config["num_layers"] + config["num_single_layers"]), config["num_attention_heads"] * config["attention_head_dim"]

    def head_dim(self, config) -> int:
        return config["attention_head_dim"]

    # diffusers: a plain-dict config, from_config, the dir's own config at load, torch_dtype
    def new_model(self, cls: type, config) -> torch.nn.Module:
        return cls.from_config(config)

    def pretrained_kwargs(self, config, dtype: torch.dtype) -> dict[str, Any]:
        return {"torch_dtype": dtype}

    def stock_model(self, model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
        return diffusers_stock_model(model, state_dict)
