"""Where hfpatch's own Triton kernels run (the fused loss's chunks, the SwiGLU MLP's elementwise halves): on CUDA,
for float32 or narrower tensors (they compute in float32), when triton imports; elsewhere the same arithmetic in
PyTorch, so float64 stays exact."""

from __future__ import annotations

import functools
import importlib.util

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def _triton_importable() -> bool:  # asked on every MLP and loss call: look once
    return importlib.util.find_spec("triton") is not None


def kernel_choice(device: torch.device, dtype: torch.dtype) -> str:
    """``triton`` or ``eager`` for ``dtype`` tensors on ``device``."""
    if torch.device(device).type == "cuda" and dtype in TRITON_DTYPES and _triton_importable():
        return "triton"
    return "eager"
