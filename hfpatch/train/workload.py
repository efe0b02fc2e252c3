"""What a model family trains on: its data, its micro-batches and its loss.

The loop is the same for every family; a ``Workload`` supplies the family's parts:
causal LMs (decoder-lm, decoder-moe, state-space) read packed text, LLaVA packed
image+text samples (``multimodal``; ``--data`` read by ``llava_data``), Flux packed
latents with flow matching (``diffusion``; ``--data`` read by ``flux_data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import diffusion, flux_data, llava_data, multimodal
from .batches import BatchStats, packed_micro_batch, padded_micro_batch, step_stats
from .build import model_config
from .config import TrainConfig
from .data import check_vocab, load_dataset, load_run_tokenizer
from .errors import ConfigError

LANGUAGE_FAMILIES = ("decoder-lm", "decoder-moe", "state-space")
VISION_LANGUAGE, DIFFUSION = "vision-language", "diffusion-transformer"
# synthetic samples in the embedded default data sets
SYNTHETIC_SAMPLES = 256


@dataclass
class Workload:
    dataset: Any  # .rows, .seq_len, .num_documents, .num_tokens, .efficiency, .fingerprint
    source: str  # the data, for messages
    tokenizer: Any  # a TextTokenizer (exported with the model), a caption vocab, or None
    tokenizer_source: str
    config: Any  # the model config
    stats: Callable[[Sequence[Any]], BatchStats]
    # (rows of one micro-batch, sp rank, sp size, seed of its random draws) -> this rank's batch
    micro_batch: Callable[[Sequence[Any], int, int, int], dict[str, Any]]
    # (model, batch, step's global targets, device) -> this rank's loss share; None: causal LM loss
    loss: Callable[..., torch.Tensor] | None = None
    # called on the built model before it is wrapped and the optimizer made
    prepare_model: Callable[[torch.nn.Module], None] | None = None


def freeze_vision_tower(model: torch.nn.Module) -> None:
    """LLaVA-1.5's recipe: the CLIP encoder stays frozen, the projector and language model train.
    (Its last layer never gets a gradient anyway: LLaVA reads the second-to-last.)"""
    model.model.vision_tower.requires_grad_(False)


def check_supported(entry, cfg: TrainConfig) -> None:
    """Options the image families do not take (yet), refused before any work. LLaVA takes a checkpoint and an
    export only with --data: the synthetic captions' word vocab matches no real tokenizer. (Flux's synthetic
    latents follow whatever config the model has.)"""
    if entry.family in LANGUAGE_FAMILIES:
        return
    if not cfg.packed:
        raise ConfigError(f"--padded is not supported for {entry.name} ({entry.family}) yet; it trains packed")
    for flag, given in (("--model-path", cfg.model_path), ("--export", cfg.export)):
        if entry.family == VISION_LANGUAGE and given and not cfg.data_path:
            raise ConfigError(f"{flag} needs --data for {entry.name} ({entry.family}): the embedded synthetic "
                              f"captions have their own word vocab, which no checkpoint or export shares")
    if cfg.loss_chunk and entry.family == DIFFUSION:
        raise ConfigError(f"--loss-chunk is not supported for {entry.name} ({entry.family}): "
                          f"its loss is flow matching, not a language-model loss")
    if cfg.tokenizer_path and entry.family == DIFFUSION:
        raise ConfigError(f"--tokenizer is not supported for {entry.name} ({entry.family}); "
                          f"it trains on precomputed text embeddings (prompt_embeds in the --data files)")
    if cfg.tokenizer_path and not cfg.data_path:
        raise ConfigError(f"--tokenizer needs --data for {entry.name} ({entry.family}); "
                          f"the embedded synthetic captions have their own word vocab")


def load_workload(entry, cfg: TrainConfig, rank: int, dtype: torch.dtype) -> Workload:
    check_supported(entry, cfg)
    if entry.family == VISION_LANGUAGE:
        return _llava(entry, cfg, rank)
    if entry.family == DIFFUSION:
        return _flux(entry, cfg, dtype)
    return _language(entry, cfg, rank)


def _language(entry, cfg: TrainConfig, rank: int) -> Workload:
    tokenizer, dataset, source = load_dataset(cfg, rank)
    config = model_config(entry, cfg, tokenizer.vocab_size, tokenizer.special_ids)
    check_vocab(dataset, config.vocab_size, source)
    make = packed_micro_batch if cfg.packed else padded_micro_batch
    return Workload(
        dataset=dataset, source=source, tokenizer=tokenizer, tokenizer_source=tokenizer.source, config=config,
        stats=step_stats, micro_batch=lambda rows, sp_rank, sp, seed: make(rows, sp_rank, sp, tokenizer.pad_id),
    )


def _llava(entry, cfg: TrainConfig, rank: int) -> Workload:
    if cfg.data_path:
        records = llava_data.read_records(cfg.data_path, cfg.text_field)
        vocab = load_run_tokenizer(cfg, [r.text for r in records], rank)
        config = model_config(entry, cfg, vocab_size=vocab.vocab_size)
        image_token = config.image_token_id
        # a checkpoint's tokenizer may list the image token itself (llava-hf's "<image>"): the text is split
        # at the placeholders before tokenizing, so text never turns into it
        lowest = 0 if cfg.model_path else vocab.vocab_size
        if not lowest <= image_token < config.text_config.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab.vocab_size} tokens, so image_token_index must be at least that and below "
                              f"the text vocab_size; got image_token_index={image_token}, vocab_size={config.text_config.vocab_size}")
        samples = llava_data.build_samples(records, vocab, image_token_id=image_token, image_seq_length=config.image_seq_length,
                                           image_size=config.vision_config.image_size)
        source = str(cfg.data_path)
    else:
        config = model_config(entry, cfg, vocab_size=None)
        vocab = multimodal.WordVocab()
        image_token = config.image_token_id
        if vocab.vocab_size > config.text_config.vocab_size:
            raise ConfigError(f"the caption vocab has {vocab.vocab_size} words but model vocab_size={config.text_config.vocab_size}")
        samples = multimodal.synthetic_samples(
            vocab, image_token_id=image_token, image_seq_length=config.image_seq_length,
            image_size=config.vision_config.image_size, count=SYNTHETIC_SAMPLES, seed=cfg.seed,
        )
        source = "the embedded synthetic captioned rectangles"
    dataset = multimodal.pack_rows(samples, cfg.seq_len, image_token, source)
    # the loss is the causal LM one: step._forward_inputs passes pixel_values along
    return Workload(
        dataset=dataset, source=source, tokenizer=vocab, tokenizer_source=vocab.source, config=config,
        stats=lambda rows: multimodal.llava_stats(rows, cfg.seq_len, image_token),
        micro_batch=lambda rows, sp_rank, sp, seed: multimodal.llava_micro_batch(
            rows, sp_rank, sp, image_token_id=image_token, pad_id=vocab.pad_id),
        prepare_model=freeze_vision_tower,
    )


def _flux(entry, cfg: TrainConfig, dtype: torch.dtype) -> Workload:
    config = model_config(entry, cfg, vocab_size=None)
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


def describe_config(config) -> str:
    """Layers / width / vocab of the model, for the run's header."""
    if isinstance(config, dict):  # diffusers
        return (f"{config['num_layers']} double + {config['num_single_layers']} single blocks, "
                f"{config['num_attention_heads']} x {config['attention_head_dim']} heads")
    text = getattr(config, "text_config", None)
    if text is not None:
        return (f"{text.num_hidden_layers} layers, hidden {text.hidden_size}, vocab {text.vocab_size}; "
                f"vision {config.vision_config.num_hidden_layers} layers, {config.image_seq_length} tokens an image")
    return f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"


def flops_shape(config) -> tuple[int, int]:
    """(layers, width) for the attention FLOPs estimate, which counts causal attention layers: Flux's attention is
    non-causal (each layer twice a causal one's FLOPs), a state-space model (Mamba) has none."""
    if isinstance(config, dict):
        return 2 * (config["num_layers"] + config["num_single_layers"]), config["num_attention_heads"] * config["attention_head_dim"]
    config = getattr(config, "text_config", None) or config
    if getattr(config, "num_attention_heads", None) is None:
        return 0, config.hidden_size
    return config.num_hidden_layers, config.hidden_size


def head_dim(config) -> int:
    """The attention head dim, for picking the attention kernel."""
    if isinstance(config, dict):
        return config["attention_head_dim"]
    config = getattr(config, "text_config", None) or config
    dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    return dim or (config.hidden_size // heads if heads else 64)  # Mamba has no attention: any dim does
