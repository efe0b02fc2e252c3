"""What every model family supplies to the trainer; the loop and the step know no family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..batches import BatchStats
from ..config import TrainConfig
from ..errors import ConfigError
from ..export import transformers_stock_model

# synthetic samples in the embedded default data sets of the image families
SYNTHETIC_SAMPLES = 256


@dataclass
class Workload:
    """A run's data and how a micro-batch of it becomes a loss."""

    dataset: Any  # .rows, .seq_len, .num_documents, .num_tokens, .efficiency, .fingerprint
    source: str  # the data, for messages
    tokenizer: Any  # a TextTokenizer (exported with the model), a caption vocab, or None
    tokenizer_source: str
    config: Any  # the model config
    stats: Callable[[Sequence[Any]], BatchStats]
    # (rows of one micro-batch, sp rank, sp size, seed of its random draws) -> this rank's batch
    micro_batch: Callable[[Sequence[Any], int, int, int], dict[str, Any]]
    # (model, batch, step's global targets, device) -> this rank's loss share; None: the causal LM loss over
    # the batch's labels (the step fuses or chunks it as asked)
    loss: Callable[..., torch.Tensor] | None = None
    # batch keys passed to the model as they are, cast to the parameters' dtype (LLaVA's pixel_values)
    extra_inputs: tuple[str, ...] = ()
    # called on the built model before it is wrapped and the optimizer made
    prepare_model: Callable[[torch.nn.Module], None] | None = None


class Family:
    """One unit per model family: its model config, data, micro-batches, loss, FLOPs and the options it
    refuses. ``manifest_families``: the manifests' ``family`` values it trains."""

    name: str = ""
    manifest_families: tuple[str, ...] = ()
    trains_padded: bool = True  # --padded: the same documents in padded batches

    def check_supported(self, entry, cfg: TrainConfig) -> None:
        """Options this family does not take, refused before any work."""
        if not (cfg.packed or self.trains_padded):
            raise ConfigError(f"--padded is not supported for {entry.name} ({entry.family}) yet; it trains packed")

    def model_config(self, entry, cfg: TrainConfig, vocab_size: int | None, special_ids: Mapping[str, int | None] | None = None):
        """The config the run trains: the manifest's tiny one or ``--model-path``'s, with ``model.*`` applied."""
        raise NotImplementedError

    def load(self, entry, cfg: TrainConfig, rank: int, dtype: torch.dtype) -> Workload:
        raise NotImplementedError

    def describe_config(self, config) -> str:
        """Layers / width / vocab, for the run's header."""
        raise NotImplementedError

    def flops_shape(self, config) -> tuple[int, int]:
        """(causal-attention-equivalent layers, width) for the attention FLOPs estimate."""
        raise NotImplementedError

    def head_dim(self, config) -> int:
        """The attention head dim, for picking the attention kernel."""
        raise NotImplementedError

    # -- the model's library: transformers (a config object) by default -----------------------------------

    def new_model(self, cls: type, config) -> torch.nn.Module:
        return cls(config)

    def pretrained_kwargs(self, config, dtype: torch.dtype) -> dict[str, Any]:
        """``from_pretrained`` keywords for the checkpoint dir ``--model-path``."""
        return {"config": config, "dtype": dtype}

    def stock_model(self, model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
        """The trained weights in the library's own class, for ``--export``."""
        return transformers_stock_model(model, state_dict)


def transformers_flops_shape(config) -> tuple[int, int]:
    """A transformers config's causal attention layers and width; a state-space model (Mamba) has none."""
    if getattr(config, "num_attention_heads", None) is None:
        return 0, config.hidden_size
    return config.num_hidden_layers, config.hidden_size


def transformers_head_dim(config) -> int:
    dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    return dim or (config.hidden_size // heads if heads else 64)  # Mamba has no attention: any dim does
