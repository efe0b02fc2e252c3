"""Wrap the model for the run: torch.compile, activation checkpointing, and FSDP2 weight sharding or (one rank)
a bfloat16 weight copy."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy

from hfpatch.runtime import apply_weight_parallel, find_decoder_layers, swiglu_mlp

from .weight_copy import WeightCopy

COMPILED_PARTS = ("mlp", "norm")  # children compiled in a layer that is not compiled whole
SWIGLU_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # transformers' names, InternLM2's


def _dense_decoder_layer(layer: torch.nn.Module) -> bool:
    """An attention + dense MLP block: compiled whole. Mixture-of-experts blocks route tokens
    data-dependently (a graph break every step), state-space and diffusion blocks have their own
    loops: those compile only their MLP and norms."""
    children = dict(layer.named_children())
    return "self_attn" in children and "mlp" in children and not hasattr(children["mlp"], "experts")


def compile_decoder_layers(model: torch.nn.Module, fuse_mlp: bool = True) -> list[str]:
    """torch.compile every decoder layer in place; returns what was compiled ("layer" or child names) or fused
    ("swiglu mlp").

    A dense decoder layer compiles whole (norms, RoPE, projections, residual adds and casts fuse), FA4 or the
    reference attention inside its graph as an op (``runtime.attention_op``); under ISP, or with another kernel,
    attention runs eagerly between two graphs. A SwiGLU MLP runs eagerly between two graphs as
    ``runtime.swiglu_mlp``, which keeps less for backward than inductor would (``fuse_mlp=False``: inductor's).
    The pack comes from the layer call's arguments, so a new pack every step costs no recompile. Only ``forward``
    is compiled: the module's hooks (FSDP2, checkpointing) stay outside and parameter names stay unchanged. Other
    layers compile their MLP and norms. The norm after the last layer compiles too ("final norm"): eager, it keeps
    a float32 copy of the hidden states for backward.
    """
    compiled = []
    layers = find_decoder_layers(model)
    for norm in _final_norms(model, layers):
        norm.compile()
        compiled.append("final norm")
    for layer in layers:
        if _dense_decoder_layer(layer):
            if fuse_mlp and fuse_swiglu_mlp(layer.mlp):
                compiled.append("swiglu mlp")
            layer.forward = torch.compile(layer.forward)
            compiled.append("layer")
            continue
        for name, part in layer.named_children():
            if name.lower().endswith(COMPILED_PARTS) and not hasattr(part, "experts"):
                part.compile()
                compiled.append(name)
    return sorted(set(compiled))


def fuse_swiglu_mlp(mlp: torch.nn.Module) -> bool:
    """Run ``mlp`` through ``runtime.swiglu_mlp`` if it is a bias-free SiLU-gated MLP running its class's forward
    (a tiled one keeps its own); returns whether it does."""
    if "forward" in vars(mlp) or type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return False
    for names in SWIGLU_PROJECTIONS:
        gate, up, down = (getattr(mlp, name, None) for name in names)
        if all(isinstance(p, torch.nn.Linear) and p.bias is None for p in (gate, up, down)):
            break
    else:
        return False

    @torch.compiler.disable  # between the compiled layer's graphs: traced, inductor would keep h for backward
    def forward(x: torch.Tensor) -> torch.Tensor:
        return swiglu_mlp(x, gate.weight, up.weight, down.weight)  # weights looked up per call: FSDP2 swaps them

    mlp.forward = forward
    return True


def _final_norms(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The norms beside a list of decoder layers (``model.model.norm``, Mamba's ``norm_f``)."""
    ids = {id(layer) for layer in layers}
    norms = []
    for module in model.modules():
        children = dict(module.named_children())
        if any(isinstance(c, torch.nn.ModuleList) and any(id(m) in ids for m in c) for c in children.values()):
            norms += [child for name, child in children.items() if name.lower().endswith(("norm", "norm_f"))]
    return norms


def checkpoint_layers(model: torch.nn.Module, fraction: float) -> int:
    """Activation checkpointing for ``fraction`` of the decoder layers: all (transformers' own switch where the
    model has it), else the first ``int(fraction * layers)``, as InternEvo's ``model.checkpoint``. Returns how many."""
    layers = find_decoder_layers(model)
    if fraction >= 1 and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return len(layers)
    count = int(fraction * len(layers))
    for layer in layers[:count]:
        _recompute_in_backward(layer)
    return count


def _recompute_in_backward(layer: torch.nn.Module) -> None:
    # the instance's forward is wrapped, not the module, so parameter names (checkpoints, FSDP2) stay as they are
    forward = layer.forward

    def checkpointed(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed


def parallelize(
    model: torch.nn.Module, *, world: int, activation_checkpointing: bool | float, compute_dtype: torch.dtype | None = None,
    compile_layers: bool = False, cpu_offload: bool = False, reshard_after_forward: bool = True,
    weight_copy: bool = True,
) -> WeightCopy | None:
    """In place. FSDP2 whenever there is more than one rank, host offload is wanted, or mixed precision on one
    rank without ``weight_copy``; mixed precision on one rank with it: a :class:`WeightCopy`, returned.

    ``activation_checkpointing``: True / False, or the fraction of decoder layers that recompute.
    ``cpu_offload``: FSDP2 keeps the sharded parameters, their gradients (and so the optimizer) on the host.
    ``reshard_after_forward``: FSDP2 frees each layer's gathered weights after forward (and gathers them again
    in backward)."""
    if compile_layers:
        compile_decoder_layers(model)
    if activation_checkpointing:
        checkpoint_layers(model, float(activation_checkpointing))
    if world == 1 and compute_dtype is not None and weight_copy and not cpu_offload:
        return WeightCopy(model, compute_dtype)
    if world > 1 or compute_dtype is not None or cpu_offload:
        # Every rank (ISP and data parallel alike) holds part of the gradient, and
        # the loss is already normalised by the global token count: FSDP2 sums.
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
        apply_weight_parallel(model, mp_policy=policy, offload_policy=CPUOffloadPolicy() if cpu_offload else None,
                              reshard_after_forward=reshard_after_forward)
        if dist.get_backend() == "gloo":
            _force_sum_reductions(model)
    return None


def _force_sum_reductions(model: torch.nn.Module) -> None:
    # gloo has no PREMUL_SUM, which FSDP2 picks for a divide factor of 1.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce on all but the last micro-batch of an accumulation step."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
