"""LLaVA (vision-language): packed image+text samples, the causal LM loss over the text, vision tower frozen."""

from __future__ import annotations

from typing import Mapping

import torch

from .. import llava_data, multimodal
from ..build import check_checkpoint_vocab, check_heads, check_override_keys, checkpoint_config, tiny_config
from ..config import TrainConfig
from ..data import load_run_tokenizer
from ..errors import ConfigError
from .base import SYNTHETIC_SAMPLES, Family, Workload, transformers_flops_shape, transformers_head_dim


def freeze_vision_tower(model: torch.nn.Module) -> None:
    """LLaVA-1.5's recipe: the CLIP encoder stays frozen, the projector and language model train.
    (Its last layer never gets a gradient anyway: LLaVA reads the second-to-last.)"""
    model.model.vision_tower.requires_grad_(False)


class Llava(Family):
    name = "LLaVA"
    trains_padded = False
    manifest_families = ("vision-language",)

    def check_supported(self, entry, cfg: TrainConfig) -> None:
        """A checkpoint, an export and a tokenizer only with --data: the synthetic captions' word vocab matches none."""
        super().check_supported(entry, cfg)
        for flag, given in (("--model-path", cfg.model_path), ("--export", cfg.export)):
            if given and not cfg.data_path:
                raise ConfigError(f"{flag} needs --data for {entry.name} ({entry.family}): the embedded synthetic "
                                  f"captions have their own word vocab, which no checkpoint or export shares")
        if cfg.tokenizer_path and not cfg.data_path:
            raise ConfigError(f"--tokenizer needs --data for {entry.name} ({entry.family}); "
                              f"the embedded synthetic captions have their own word vocab")

    def model_config(self, entry, cfg: TrainConfig, vocab_size: int | None, special_ids: Mapping[str, int | None] | None = None):
        """``vocab_size`` (a text tokenizer, tiny config): the text vocab becomes the tokenizer's plus one, the image
        token, so no text token is taken for an image; ``model.*`` overrides still win. The language model's
        positions cover seq_len."""
        values = dict(cfg.model_overrides)
        if cfg.model_path:  # the checkpoint's own config
            config = checkpoint_config(entry, cfg, values)
            check_checkpoint_vocab(vocab_size, config.text_config.vocab_size, "text vocab_size", cfg.model_path)
            check_heads(config.text_config, cfg.sp)
            config.use_cache = config.text_config.use_cache = False
            return config
        check_override_keys(tiny_config(entry), values, f"{entry.name} tiny")
        text = dict(entry.test_config.get("text_config", {}))
        if vocab_size is not None:
            text["vocab_size"] = vocab_size + 1
            values.setdefault("image_token_index", vocab_size)
        text.update(values.pop("text_config", None) or {})
        text["max_position_embeddings"] = max(text.get("max_position_embeddings", 0), cfg.seq_len)
        config = tiny_config(entry, text_config=text, **values)
        check_heads(config.text_config, cfg.sp)
        config.use_cache = config.text_config.use_cache = False
        return config

    def load(self, entry, cfg: TrainConfig, rank: int, dtype: torch.dtype) -> Workload:
        if cfg.data_path:
            records = llava_data.read_records(cfg.data_path, cfg.text_field)
            vocab = load_run_tokenizer(cfg, [r.text for r in records], rank)
            config = self.model_config(entry, cfg, vocab_size=vocab.vocab_size)
            image_token = config.image_token_id
            # a checkpoint's tokenizer may list the image token itself (llava-hf's "<image>"): the text is split
            # at the placeholders before tokenizing, so text never turns into it
            lowest = 0 if cfg.model_path else vocab.vocab_size
            if not lowest <= image_token < config.text_config.vocab_size:
                raise ConfigError(f"the tokenizer has {vocab.vocab_size} tokens, so image_token_index must be at least that "
                                  f"and below the text vocab_size; got image_token_index={image_token}, "
                                  f"vocab_size={config.text_config.vocab_size}")
            samples = llava_data.build_samples(records, vocab, image_token_id=image_token,
                                               image_seq_length=config.image_seq_length,
                                               image_size=config.vision_config.image_size)
            source = str(cfg.data_path)
        else:
            config = self.model_config(entry, cfg, vocab_size=None)
            vocab = multimodal.WordVocab()
            image_token = config.image_token_id
            if vocab.vocab_size > config.text_config.vocab_size:
                raise ConfigError(f"the caption vocab has {vocab.vocab_size} words but model vocab_size="
                                  f"{config.text_config.vocab_size}")
            samples = multimodal.synthetic_samples(
                vocab, image_token_id=image_token, image_seq_length=config.image_seq_length,
                image_size=config.vision_config.image_size, count=SYNTHETIC_SAMPLES, seed=cfg.seed,
            )
            source = "the embedded synthetic captioned rectangles"
        dataset = multimodal.pack_rows(samples, cfg.seq_len, image_token, source)
        return Workload(
            dataset=dataset, source=source, tokenizer=vocab, tokenizer_source=vocab.source, config=config,
            stats=lambda rows: multimodal.llava_stats(rows, cfg.seq_len, image_token),
            micro_batch=lambda rows, sp_rank, sp, seed: multimodal.llava_micro_batch(
                rows, sp_rank, sp, image_token_id=image_token, pad_id=vocab.pad_id),
            extra_inputs=("pixel_values",),  # every image of the pack, on every ISP rank
            prepare_model=freeze_vision_tower,
        )

    def describe_config(self, config) -> str:
        text = config.text_config
        return (f"{text.num_hidden_layers} layers, hidden {text.hidden_size}, vocab {text.vocab_size}; "
                f"vision {config.vision_config.num_hidden_layers} layers, {config.image_seq_length} tokens an image")

    def flops_shape(self, config) -> tuple[int, int]:
        return transformers_flops_shape(config.text_config)

    def head_dim(self, config) -> int:
        return transformers_head_dim(config.text_config)
