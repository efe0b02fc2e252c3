"""Where hfpatch's own Triton kernels run (the fused loss's chunks, the SwiGLU MLP's elementwise halves): on CUDA,
for float32 or narrower tensors (they compute in float32), when triton imports; elsewhere the same arithmetic in
PyTorch, so float64 stays exact."""

from __future__ import annotations

import importlib.util

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_choice(device: torch.device, dtype: torch.dtype) -> str:
    """``triton`` or ``eager`` for ``dtype`` tensors on ``device``."""
    if torch.device(device).type == "cuda" and dtype in TRITON_DTYPES and importlib.util.find_spec("triton"):
        return "triton"
    return "eager"
