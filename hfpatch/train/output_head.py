"""The chunked LM loss in the trainer (``--loss-chunk``): the model returns hidden states, not logits.

The causal LM's output projection is swapped for :class:`HiddenStatesHead`, which owns the same
weight (same parameter name, so checkpoints and exports are unchanged; tied embeddings stay tied)
but returns its input. The step then applies the projection and the cross entropy a chunk of
tokens at a time (:func:`hfpatch.runtime.chunked_causal_lm_loss`), so a long sequence's
``[tokens, vocab]`` logits never exist whole.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


class HiddenStatesHead(nn.Module):
    """Stands in for a bias-free ``nn.Linear`` output head; the loss applies ``weight``."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def deferral_problem(model: nn.Module) -> str | None:
    """Why ``model``'s output projection cannot move into the loss, or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # exactly nn.Linear: a subclass may change the projection (Baichuan2's NormHead normalises its rows)
    if type(head) is not nn.Linear or head.bias is not None:
        kind = "no output head" if head is None else f"a {type(head).__name__} output head"
        return f"it has {kind}, not a plain bias-free linear projection"
    return None


def defer_output_projection(model: nn.Module, model_name: str, flag: str = "--loss-chunk") -> None:
    """Swap ``model``'s output head for a :class:`HiddenStatesHead`, or say why it cannot be."""
    problem = deferral_problem(model)
    if problem is not None:
        raise ConfigError(f"{flag} is not supported for {model_name}: {problem}")
    model.set_output_embeddings(HiddenStatesHead(model.get_output_embeddings()))


def output_weight(model: nn.Module) -> torch.Tensor:
    """The projection the chunked loss applies (under FSDP2: the gathered weight, read after forward)."""
    return model.get_output_embeddings().weight
