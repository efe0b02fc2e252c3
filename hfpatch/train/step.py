"""One optimizer step: micro-batches, token-weighted loss, backward, clip, update.

Every micro-batch's loss is its token-loss sum over the step's GLOBAL target count
(all micro-batches, all ISP and data-parallel ranks), so the summed gradients are
those of the single-process mean loss, whatever sp / dp / micro_num are.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from hfpatch.runtime import (
    ParallelMode, causal_lm_loss, chunked_causal_lm_loss, clear_packed_batch, fused_linear_causal_lm_loss, global_loss,
    gpc, set_packed_batch, to_device,
)

from . import faults
from .errors import NonFiniteLossError
from .output_head import output_weight
from .parallelize import set_gradient_sync


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    lr: float


def _forward_inputs(batch: dict[str, Any], device: torch.device, router_aux: bool, dtype: torch.dtype | None,
                    extra_inputs: Sequence[str]) -> dict[str, Any]:
    inputs: dict[str, Any] = {k: to_device(batch[k], device) for k in ("input_ids", "position_ids", "attention_mask")
                              if k in batch}
    for key in extra_inputs:
        if batch.get(key) is not None:
            inputs[key] = to_device(batch[key], device, dtype)
    inputs["use_cache"] = False  # training: a KV cache would only copy every layer's keys and values
    if router_aux:
        inputs["output_router_logits"] = True
        if "token_mask" in batch:  # packed: the router statistics skip the pack's padding
            inputs["attention_mask"] = to_device(batch["token_mask"], device)
    return inputs


def _router_aux_coef(model: torch.nn.Module) -> float:
    """MoE load-balancing weight when the model's config enables it, else 0."""
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0))


def _clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """The norm of the gradients the optimizer steps with; they are scaled to ``max_norm`` only when above it
    (a step under the limit skips a pass over them)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if 0 < max_norm < value:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return value


def _micro_batch_loss(model, batch, *, num_targets, packed, device, loss_fn, extra_inputs, input_dtype, loss_chunk,
                      fused_loss, aux_coef, packs_per_step) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch, num_targets, device)
    if packed:
        set_packed_batch(batch["cu_seqlens"], batch["max_seqlen"], device=device)
    else:
        clear_packed_batch()
    labels = to_device(batch["labels"], device)  # queued before the forward: no copy waits on it
    output = model(**_forward_inputs(batch, device, aux_coef > 0, input_dtype, extra_inputs))
    if fused_loss:
        # the hidden states are read no more: their storage takes their gradient
        loss = fused_linear_causal_lm_loss(output.logits, output_weight(model), labels, num_valid_tokens=num_targets,
                                           chunk_tokens=loss_chunk or None, overwrite_hidden_states=True)
    elif loss_chunk:
        loss = chunked_causal_lm_loss(output.logits, output_weight(model), labels, chunk_tokens=loss_chunk,
                                      num_valid_tokens=num_targets)
    else:
        loss = causal_lm_loss(output.logits, labels, num_valid_tokens=num_targets)
    if aux_coef > 0 and output.aux_loss is not None:
        loss = loss + aux_coef * output.aux_loss / packs_per_step
    return loss


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    micro_batches: Sequence[dict[str, Any]],
    *,
    num_targets: int,
    packed: bool,
    device: torch.device,
    clip_grad_norm: float,
    step: int,
    rank: int,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    extra_inputs: Sequence[str] = (),
    input_dtype: torch.dtype | None = None,
    loss_chunk: int = 0,
    fused_loss: bool = False,
    activation_offload: contextlib.AbstractContextManager | None = None,
) -> StepResult:
    """``loss_fn(model, batch, num_targets, device)``: this rank's share of a micro-batch's loss
    (Flux's flow matching); None for the causal LM loss. ``extra_inputs``: batch keys passed to the model cast
    to ``input_dtype`` (LLaVA's pixel_values).
    ``loss_chunk``: the model returns hidden states (``output_head.defer_output_projection``) and
    the causal LM loss projects them this many tokens at a time. ``fused_loss``: the model returns hidden
    states too and the projection runs fused into the cross entropy (``fused_linear_causal_lm_loss``).
    ``activation_offload``: entered around each micro-batch's forward and loss (``offload.ActivationOffload``);
    backward runs outside it."""
    lr = scheduler.get_last_lr()[0]
    loss_sum = torch.zeros((), device=device)
    aux_coef = _router_aux_coef(model)
    # each pack's aux loss is a mean over that pack: average it over the step's packs on all data ranks
    packs_per_step = len(micro_batches) * max(gpc.get_world_size(ParallelMode.DATA), 1)
    for index, batch in enumerate(micro_batches):
        set_gradient_sync(model, index == len(micro_batches) - 1)
        with activation_offload or contextlib.nullcontext():
            loss = _micro_batch_loss(model, batch, num_targets=num_targets, packed=packed, device=device,
                                     loss_fn=loss_fn, extra_inputs=extra_inputs, input_dtype=input_dtype,
                                     loss_chunk=loss_chunk, fused_loss=fused_loss, aux_coef=aux_coef,
                                     packs_per_step=packs_per_step)
        loss = faults.maybe_poison(loss, step, rank)
        loss.backward()
        loss_sum += loss.detach().float()
    clear_packed_batch()
    loss_value = global_loss(loss_sum)
    grad_norm = _clip_grad_norm(optimizer, clip_grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        raise NonFiniteLossError(f"{what} is {loss_value if what == 'loss' else grad_norm} at step {step}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, grad_norm=grad_norm, lr=lr)
