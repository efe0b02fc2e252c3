"""Activation offload: the large tensors autograd saves between forward and backward wait in host memory.

With activation checkpointing, what a decoder layer keeps for backward is its input (torch's
non-reentrant checkpoint saves it through autograd's saved-tensor hooks); everything else is
recomputed. At long sequences those inputs are most of the GPU's activation memory (Llama-2-7B at
256K tokens a GPU: 32 layers x 2 GiB). Under :class:`ActivationOffload` each saved tensor of at least
``min_bytes`` is copied to pinned host memory on a side stream while compute goes on, its GPU memory is
released once the copy is done, and in backward it is copied back on the same side stream -- the
tensor needed next (the previous layer's) is fetched while the current one is being used.
Parameters (leaves that require grad) and small tensors stay where they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Offloaded:
    index: int
    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None  # host copy done (CUDA)
    fetched: torch.Tensor | None = None  # back on the device (or being copied there)
    ready: torch.cuda.Event | None = None
    used: bool = False  # unpacked at least once: no more prefetching


class ActivationOffload:
    """``with ActivationOffload(): loss = model(...)``; then ``loss.backward()`` outside the block."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._saved: list[_Offloaded] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.offloaded_bytes = 0  # of the last forward, for logs and tests

    def __enter__(self) -> "ActivationOffload":
        self._saved = []
        self.offloaded_bytes = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _keeps(self, tensor: torch.Tensor) -> bool:
        small = tensor.numel() * tensor.element_size() < self.min_bytes
        parameter = tensor.is_leaf and tensor.requires_grad
        return small or parameter or tensor.device.type not in ("cuda", "cpu")

    def _pack(self, tensor: torch.Tensor):
        if self._keeps(tensor):
            return tensor
        pinned = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
        copied = None
        if pinned:
            self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            tensor.record_stream(self._stream)  # its memory is not reused before the copy has read it
        else:
            host.copy_(tensor)
        self.offloaded_bytes += host.numel() * host.element_size()
        entry = _Offloaded(len(self._saved), host, tensor.device, copied)
        self._saved.append(entry)
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        if entry.fetched is not None:
            return
        if entry.copied is None:  # a CPU tensor: the host copy is the tensor
            entry.fetched = entry.host
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(entry.copied)
            entry.fetched = entry.host.to(entry.device, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record()

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        self._fetch(packed)
        packed.used = True
        before = self._saved[packed.index - 1] if packed.index > 0 else None
        if before is not None and not before.used:  # backward runs layers in reverse: it is needed next
            self._fetch(before)
        tensor = packed.fetched
        if packed.ready is not None:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.ready)
            tensor.record_stream(current)
        packed.fetched = packed.ready = None  # one use per unpack; autograd holds the result
        return tensor
