"""Weight parallel: FSDP2 ``fully_shard`` over the WEIGHT mesh dimension.

Weights are sharded over ``wp`` and replicated over ``wdp`` (HSDP when wdp > 1), so
every rank of the world takes part in the gradient reduction: ISP ranks and
data-parallel ranks alike. FSDP2 does all the collectives.
"""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from .context import gpc


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one.

    HF models name them in ``_no_split_modules``; otherwise take the longest
    ``nn.ModuleList`` in the model.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        layers = [m for m in model.modules() if type(m).__name__ in names]
        # the outermost only: a model may name a block and a module inside it (Mamba: MambaBlock, MambaMixer)
        inner = {id(sub) for layer in layers for sub in layer.modules() if sub is not layer}
        layers = [m for m in layers if id(m) not in inner]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def weight_parallel_mesh(mesh=None):
    """The mesh FSDP2 uses: 1-D ("wp") if there is no replication, else ("wdp", "wp")."""
    mesh = mesh if mesh is not None else gpc.weight_mesh
    if mesh is None:
        raise RuntimeError("weight parallel needs the runtime: call hfpatch.runtime.initialize() first")
    if mesh.ndim == 2 and mesh.size(0) == 1:
        return mesh[mesh.mesh_dim_names[1]]
    return mesh


def apply_weight_parallel(
    model: nn.Module,
    *,
    layers: Iterable[nn.Module] | None = None,
    mesh=None,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    gradient_divide_factor: float | None = 1.0,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer, then the root
    (``reshard_after_forward`` applies to the layers; the root keeps its weights gathered
    until backward).

    ``gradient_divide_factor=1.0`` makes FSDP2 sum gradients across ranks, which is
    what :func:`hfpatch.runtime.causal_lm_loss` (normalised by the global token
    count) needs to reproduce single-process gradients. Pass None for FSDP2's
    default mean (for a loss that is a per-rank mean).
    """
    fsdp_mesh = weight_parallel_mesh(mesh)
    kwargs = {"mesh": fsdp_mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for layer in list(layers) if layers is not None else find_decoder_layers(model):
        fully_shard(layer, **kwargs)
    # The root (embeddings, final norm, output head) stays gathered from forward to backward, as
    # FSDP2 itself chooses for a root: backward needs it first, and a loss computed after forward
    # (chunked_causal_lm_loss on the output head's weight) reads it.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    # Over a single rank the sum is the gradient itself; a factor (even 1.0) makes FSDP2 divide every gradient
    # by it, one more pass over them each step.
    if gradient_divide_factor is not None and fsdp_mesh.size() > 1:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(gradient_divide_factor)
    return model
