"""What this machine runs: the attention backend auto picks and why, the fused loss, versions.

``hfpatch env`` prints it; the trainer's header says the same in one line.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import torch

from hfpatch import runtime

OPTIONAL_PACKAGES = ("flash-attn-4", "flash-attn", "triton", "liger-kernel", "transformers", "diffusers")


@dataclass(frozen=True)
class BackendRow:
    name: str
    problem: str | None  # why it cannot run here, None if it can
    chosen: bool


@dataclass(frozen=True)
class Environment:
    torch: str
    device: str
    packages: dict[str, str | None]
    backends: list[BackendRow]
    fused_loss: str
    swiglu_mlp: str


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm{major}{minor}, CUDA {torch.version.cuda})"


def inspect_environment(dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, device: torch.device | None = None) -> Environment:
    """Every attention backend for a causal call in ``dtype`` with ``head_dim`` on ``device`` (default: the GPU
    if there is one): whether it can run and why not; which one runs ($HFPATCH_ATTN_BACKEND, else auto's pick;
    AttentionBackendError if the one asked for cannot run)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = torch.empty(0, 1, head_dim, dtype=dtype, device=device)
    chosen = runtime.resolve_backend(None, probe, window=(-1, 0))  # $HFPATCH_ATTN_BACKEND, else auto
    rows = [BackendRow(name, problem, name == chosen) for name, problem in runtime.explain_backends(probe, window=(-1, 0))]
    return Environment(
        torch=torch.__version__, device=describe_device(device),
        packages={name: _version(name) for name in OPTIONAL_PACKAGES},
        backends=rows, fused_loss=runtime.fused_loss_kernel(device, dtype),
        swiglu_mlp=runtime.swiglu_mlp_kernel(device, dtype),
    )


def attention_summary(env: Environment) -> str:
    """One line: the chosen backend and why each faster one was passed over."""
    chosen = next(row.name for row in env.backends if row.chosen)
    if env.device == "cpu":  # no kernel runs on a CPU: nothing to explain
        return chosen
    skipped = []
    for row in env.backends:
        if row.chosen:
            break
        skipped.append(f"{row.name}: {row.problem}")
    return chosen + (f" (passed over {'; '.join(skipped)})" if skipped else "")
