"""One rank, bfloat16 compute over float32 weights without FSDP2: a bfloat16 copy of the weights runs the model.

FSDP2 over a single rank still casts every float32 weight and copies it through its all-gather buffers in
forward (and again in backward), and copies every gradient back: on an H200 the 0.95B model's trainer ran at
0.896 of its bare forward/backward with it, 0.956 with this. Here the model's parameters are bfloat16 copies
kept between steps, and the optimizer updates the float32 masters: as soon as backward has accumulated a
copy's gradient it is added to its master's float32 gradient and freed (micro-batches accumulate in float32,
as under FSDP2's float32 reduce), and each optimizer step ends by copying the masters into the model.
Checkpoints and exports see the masters under the model's own parameter names (``masters_in_model``). The
cost: the copies stay, 2 bytes a parameter that FSDP2 frees per layer.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from hfpatch.runtime import find_decoder_layers


class WeightCopy:
    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []  # module, name, master, copy
        copies: dict[int, nn.Parameter] = {}  # tied weights: one copy per master
        for module in model.modules():
            for name, master in list(module._parameters.items()):
                if master is None:
                    continue
                if id(master) not in copies:
                    copies[id(master)] = _copy_of(master, dtype)
                module._parameters[name] = copies[id(master)]
                self._slots.append((module, name, master, copies[id(master)]))
        unique = {id(master): (master, copy) for _, _, master, copy in self._slots}.values()
        self._masters = [master for master, _ in unique]
        self._copies = [copy for _, copy in unique]
        # where FSDP2's mixed precision casts floating inputs (the root and each decoder layer): a float32 input
        # (pixel values, rotary tables built from float32 buffers) would otherwise meet bfloat16 weights
        for module in (model, *find_decoder_layers(model)):
            module.register_forward_pre_hook(self._cast_inputs, with_kwargs=True)

    def _cast_inputs(self, module, args, kwargs):
        cast = functools.partial(_cast_floating, dtype=self.dtype)
        return tree_map(cast, args), tree_map(cast, kwargs)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer steps the masters; each step ends by copying them into the model."""
        optimizer.register_step_post_hook(lambda *_: self.copy_to_model())

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self._copies, self._masters)

    @contextlib.contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """The model holds the float32 masters (to build the optimizer, save, load or export), then its copies
        again, refreshed from the masters (a load changed them)."""
        for module, name, master, _ in self._slots:
            module._parameters[name] = master
        try:
            yield
        finally:
            for module, name, _, copy in self._slots:
                module._parameters[name] = copy
            self.copy_to_model()


def _copy_of(master: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    copy = nn.Parameter(master.detach().to(dtype), requires_grad=master.requires_grad)
    if master.requires_grad:
        copy.register_post_accumulate_grad_hook(functools.partial(_add_to_master, master))
    return copy


def _add_to_master(master: nn.Parameter, copy: nn.Parameter) -> None:
    if master.grad is None:
        master.grad = copy.grad.to(master.dtype)
    else:
        master.grad.add_(copy.grad)
    copy.grad = None


def _cast_floating(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
