"""Where this process sits in a torchrun launch, and launching torchrun for ``--nproc``."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

# Set by the ``--nproc`` launcher for its workers: its pid. The launcher holds the run dir.
LAUNCHER_ENV = "HFPATCH_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
# Long enough for interrupted workers to finish their step and save (torchrun's default is 30 s).
SHUTDOWN_TIMEOUT_S = "600"
# Exit statuses of workers stopped by SIGINT / SIGTERM after saving.
INTERRUPT_STATUSES = {128 + signal.SIGINT, 128 + signal.SIGTERM}


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


def under_launcher() -> bool:
    """Whether this process is a worker of ``hfpatch train --nproc``."""
    return LAUNCHER_ENV in os.environ


def prepare_worker() -> None:
    """First thing in a ``python -m hfpatch.train`` process (before the heavy imports).

    In a multi-process run, SIGINT ends the process at once (the default action) until
    the training loop takes it over to stop cleanly: Python's KeyboardInterrupt would
    wait for a blocking store or collective call that never returns once a peer has
    exited, and hang the run.
    """
    if world_info().world > 1:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if under_launcher():
        _die_with_launcher()


def _die_with_launcher() -> None:
    """End this worker when its ``--nproc`` launcher dies, even by ``kill -9``.

    torchrun starts each worker in its own session, so killing the launcher's process
    group leaves them training on, racing any resume in the same run dir.
    """
    launcher = int(os.environ[LAUNCHER_ENV])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: poll instead
        threading.Thread(target=_exit_when_orphaned, args=(launcher,), daemon=True, name="launcher-watchdog").start()
    if os.getppid() != launcher:  # it died before the signal was armed
        os._exit(1)


def _exit_when_orphaned(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(1)
    os._exit(1)


def all_ranks_max(value: int) -> int:
    """The largest ``value`` over every process of the default group (``value`` alone without one)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


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
    SIGINT / SIGTERM reach the workers through the agent; they save and stop, and the
    status is 128 + the signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # One BLAS thread per core share, instead of torchrun's warning and default of 1.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    # Each torchrun module sets its own logger's level, so the parent's level alone does not quiet them.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args([
        "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--module", "hfpatch.train", *worker_args,
    ])
    # The agent installs its own handlers (they raise SignalException); put ours back after.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        run(args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if len(codes) == 1 and codes <= INTERRUPT_STATUSES:  # a worker was signalled directly
            return codes.pop()
        if codes != {1}:
            details = ", ".join(f"rank {r}: exit code {f.exitcode}" for r, f in sorted(exc.failures.items()))
            print(f"error: training workers failed ({details})", file=sys.stderr, flush=True)
        return 1
    finally:
        del os.environ[LAUNCHER_ENV]
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0
