"""Where this process sits in a torchrun launch, and launching torchrun for ``--nproc``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world: int
    local_rank: int
    attempt: int  # torchrun restart count


def world_info() -> WorldInfo:
    env = os.environ
    return WorldInfo(
        rank=int(env.get("RANK", 0)), world=int(env.get("WORLD_SIZE", 1)),
        local_rank=int(env.get("LOCAL_RANK", 0)), attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


@contextlib.contextmanager
def attempt_scoped_process_group() -> Iterator[None]:
    """Under torchrun's shared agent store, own the default process group, keyed per restart.

    torchrun hands every worker attempt the same TCPStore (TORCHELASTIC_USE_AGENT_STORE),
    so a restarted worker can read the previous attempt's gloo/NCCL addresses and hang
    or fail to connect (pytorch/pytorch#135712). A store prefix per restart count keeps
    attempts apart. The runtime reuses an existing default group.
    """
    import torch
    import torch.distributed as dist

    info = world_info()
    if info.world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        yield
        return

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world, is_master=False)
    store = dist.PrefixStore(f"hfpatch/attempt_{info.attempt}", client)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def strip_option(args: list[str], name: str) -> list[str]:
    """``args`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def run_torchrun(nproc: int, worker_args: list[str], max_restarts: int = 0) -> int:
    """Run ``python -m hfpatch.train WORKER_ARGS`` on ``nproc`` local processes; exit status.

    torchrun's agent runs in this process. Workers print their own ``error:`` line,
    so a worker that exits with status 1 (a reported error) adds no traceback wall.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # One BLAS thread per core share, instead of torchrun's warning and default of 1.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--module", "hfpatch.train", *worker_args,
    ])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if codes != {1}:
            details = ", ".join(f"rank {r}: exit code {f.exitcode}" for r, f in sorted(exc.failures.items()))
            print(f"error: training workers failed ({details})", file=sys.stderr, flush=True)
        return 1
    return 0
