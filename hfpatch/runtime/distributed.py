"""Process-group setup: ``initialize`` / ``destroy`` and the mesh layout.

Layout (world = W ranks, sequence parallel ``sp``, weight parallel ``wp``)::

    device_mesh  = DeviceMesh(arange(W).view(W // sp, sp), ("dp", "sp"))
    weight_mesh  = DeviceMesh(arange(W).view(W // wp, wp), ("wdp", "wp"))

Both put the parallel dimension innermost, so an ISP group and a weight-parallel
group are runs of consecutive ranks (same node first under torchrun). The two
meshes are independent splits of the same ranks, as InternEvo's
``tensor=dict(size=sp, mode="isp")`` and ``weight=dict(size=wp)`` are.

    ParallelMode.TENSOR       -> "sp"   ISP all-to-all group
    ParallelMode.DATA         -> "dp"   ranks that load different packs
    ParallelMode.WEIGHT       -> "wp"   FSDP2 shard dimension
    ParallelMode.WEIGHT_DATA  -> "wdp"  FSDP2 replicate dimension (HSDP)
    ParallelMode.ZERO1        -> "wdp"  (optimizer state is sharded with the weights)
    ParallelMode.GLOBAL       -> all ranks
    ParallelMode.PIPELINE     -> this rank alone

Example, W=8, sp=2, wp=4: TENSOR groups {0,1} {2,3} {4,5} {6,7}; DATA groups
{0,2,4,6} {1,3,5,7}; WEIGHT groups {0,1,2,3} {4,5,6,7}; WEIGHT_DATA {0,4} {1,5} ...
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from .context import GroupInfo, ParallelContext, ParallelMode, gpc

_owns_process_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _check_sizes(world: int, sp: int, wp: int, dp: int | None) -> int:
    for name, size in (("sequence_parallel", sp), ("weight_parallel", wp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if world % sp:
        raise ValueError(
            f"world size {world} is not divisible by sequence_parallel={sp}"
        )
    if world % wp:
        raise ValueError(f"world size {world} is not divisible by weight_parallel={wp}")
    if dp is not None and dp * sp != world:
        raise ValueError(
            f"world size {world} does not match data_parallel={dp} x "
            f"sequence_parallel={sp} = {dp * sp}"
        )
    return world // sp


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(backend: str, rank: int, world: int) -> None:
    if "nccl" in backend:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # A single process without torchrun: an in-memory store needs no port.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)


def _mesh_info(mesh, dim: str) -> GroupInfo:
    sub = mesh[dim]
    return GroupInfo(
        local_rank=sub.get_local_rank(),
        world_size=sub.size(),
        ranks=tuple(int(r) for r in sub.mesh.flatten().tolist()),
        group=sub.get_group(),
    )


def initialize(
    sequence_parallel: int = 1,
    weight_parallel: int = 1,
    data_parallel: int | None = None,
    backend: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> ParallelContext:
    """Set up process groups and meshes and fill ``gpc``; returns ``gpc``.

    Reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (a lone process
    without them is rank 0 of 1). Reuses a default process group that already
    exists (and then leaves it alive on :func:`destroy`). ``backend`` defaults to
    NCCL when CUDA is available (device set from ``LOCAL_RANK``), else gloo.
    """
    global _owns_process_group
    if gpc.is_initialized:
        raise RuntimeError("hfpatch runtime is already initialised; call destroy() first")

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
        owns = False
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        backend = backend or _default_backend()
        owns = True
    # Check before creating anything so a bad launch fails fast instead of hanging.
    dp = _check_sizes(world, sequence_parallel, weight_parallel, data_parallel)
    if owns:
        _init_process_group(backend, rank, world)
        _owns_process_group = True

    from torch.distributed.device_mesh import init_device_mesh

    # get_backend() may read "cpu:gloo,cuda:nccl" for a multi-device default group.
    device_type = "cuda" if "nccl" in str(backend) else "cpu"
    device_mesh = init_device_mesh(
        device_type, (dp, sequence_parallel), mesh_dim_names=("dp", "sp")
    )
    weight_mesh = init_device_mesh(
        device_type, (world // weight_parallel, weight_parallel), mesh_dim_names=("wdp", "wp")
    )
    weight_data = _mesh_info(weight_mesh, "wdp")
    groups = {
        ParallelMode.GLOBAL: GroupInfo(rank, world, tuple(range(world)), dist.group.WORLD),
        ParallelMode.DATA: _mesh_info(device_mesh, "dp"),
        ParallelMode.TENSOR: _mesh_info(device_mesh, "sp"),
        ParallelMode.WEIGHT: _mesh_info(weight_mesh, "wp"),
        ParallelMode.WEIGHT_DATA: weight_data,
        ParallelMode.ZERO1: weight_data,
        ParallelMode.PIPELINE: GroupInfo(0, 1, (rank,), None),
    }
    gpc._set_groups(groups, rank)
    gpc.device_mesh = device_mesh
    gpc.weight_mesh = weight_mesh
    if config:
        gpc.load_config(config)
    return gpc


def destroy() -> None:
    """Forget all groups and config; destroy the process group if we created it."""
    global _owns_process_group
    gpc._reset()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


@contextlib.contextmanager
def parallel_context(
    sequence_parallel: int = 1,
    weight_parallel: int = 1,
    data_parallel: int | None = None,
    backend: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Iterator[ParallelContext]:
    """``with parallel_context(sequence_parallel=2) as ctx:`` -- initialize, then destroy."""
    ctx = initialize(sequence_parallel, weight_parallel, data_parallel, backend, config)
    try:
        yield ctx
    finally:
        destroy()


def current_device() -> torch.device:
    """The device this rank computes on under the current backend."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor.to(device, dtype)``; a host tensor goes to a GPU from pinned memory, without waiting: a copy from
    pageable memory makes the host wait until every queued kernel has run (a cudaStreamSynchronize), and the GPU
    then idles while the host queues the next ones."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype=dtype)
