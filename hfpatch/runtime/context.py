"""InternEvo-compatible global parallel context: ``ParallelMode`` and ``gpc``.

Patched modeling files read ``gpc.config.data`` and ask ``gpc`` for ranks, sizes and
groups. With no runtime initialised every query answers as a single process (rank 0,
world size 1, no group) so a patched model behaves like the unpatched one.

The groups themselves are built by :func:`hfpatch.runtime.distributed.initialize`;
this module only stores and answers.
"""

from __future__ import annotations

import contextlib
import enum
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping


class ParallelMode(enum.Enum):
    """Process groups, named as in InternEvo (``internlm.core.context``)."""

    GLOBAL = "global"
    # Replicas that see different data: world / sequence_parallel.
    DATA = "data"
    # The ISP sequence-parallel group (InternEvo calls it TENSOR in isp mode).
    TENSOR = "tensor"
    # FSDP2 shard group for weights (InternEvo ``weight=dict(size=M)``).
    WEIGHT = "weight"
    # Replicas of one weight shard: world / weight_parallel.
    WEIGHT_DATA = "weight_data"
    # Optimizer-state sharding group; FSDP2 already shards it with the weights,
    # so this is the weight-data group.
    ZERO1 = "zero1"
    # No pipeline parallelism: always a group of one.
    PIPELINE = "pipe"


class Config(dict):
    """A dict with attribute access (InternEvo's ``Config``); nested dicts convert."""

    def __init__(self, mapping: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(mapping or {}, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Mapping) and not isinstance(value, Config):
            value = Config(value)
        super().__setitem__(key, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def update(self, other: Mapping[str, Any] = (), **kwargs: Any) -> None:  # type: ignore[override]
        # Route through __setitem__ so nested dicts become Config too.
        for key, value in dict(other, **kwargs).items():
            self[key] = value


@dataclass(frozen=True)
class GroupInfo:
    """One rank's view of one parallel group."""

    local_rank: int
    world_size: int
    ranks: tuple[int, ...]
    group: Any  # torch.distributed.ProcessGroup, or None for a group of one


_SINGLE = GroupInfo(local_rank=0, world_size=1, ranks=(0,), group=None)


class _InitFlag:
    """``gpc.is_initialized`` works both as a bool and as InternEvo's method."""

    def __init__(self, ctx: "ParallelContext") -> None:
        self._ctx = ctx

    def __bool__(self) -> bool:
        return bool(self._ctx._groups)

    def __call__(self, mode: ParallelMode | None = None) -> bool:
        if mode is None:
            return bool(self)
        return ParallelMode(mode) in self._ctx._groups

    def __repr__(self) -> str:
        return repr(bool(self))


class ParallelContext:
    """Holds the config and the group table of this process."""

    def __init__(self) -> None:
        self._groups: dict[ParallelMode, GroupInfo] = {}
        self.config = Config({"data": {}})
        self.device_mesh = None  # DeviceMesh ("dp", "sp")
        self.weight_mesh = None  # DeviceMesh ("wdp", "wp")
        self.global_rank = 0

    # -- state (used by distributed.initialize / destroy) --------------------------

    def _set_groups(self, groups: Mapping[ParallelMode, GroupInfo], global_rank: int) -> None:
        self._groups = dict(groups)
        self.global_rank = global_rank

    def _reset(self) -> None:
        self._groups = {}
        self.device_mesh = None
        self.weight_mesh = None
        self.global_rank = 0
        self.config = Config({"data": {}})

    def load_config(self, config: Mapping[str, Any]) -> Config:
        """Merge an InternEvo-style config dict; ``data`` always stays present."""
        self.config.update(config)
        if "data" not in self.config:
            self.config["data"] = Config()
        return self.config

    # -- InternEvo query API ----------------------------------------------------------

    @property
    def is_initialized(self) -> _InitFlag:
        return _InitFlag(self)

    def _info(self, mode: ParallelMode) -> GroupInfo:
        mode = ParallelMode(mode)
        return self._groups.get(mode, _SINGLE)

    def get_local_rank(self, mode: ParallelMode) -> int:
        return self._info(mode).local_rank

    def get_world_size(self, mode: ParallelMode) -> int:
        return self._info(mode).world_size

    def get_group(self, mode: ParallelMode):
        return self._info(mode).group

    def get_ranks_in_group(self, mode: ParallelMode) -> list[int]:
        return list(self._info(mode).ranks)

    def get_global_rank(self) -> int:
        return self.global_rank

    def is_first_rank(self, mode: ParallelMode) -> bool:
        return self.get_local_rank(mode) == 0

    def is_last_rank(self, mode: ParallelMode) -> bool:
        return self.get_local_rank(mode) == self.get_world_size(mode) - 1

    def is_using_parallel_mode(self, mode: ParallelMode) -> bool:
        return self.get_world_size(mode) > 1

    def is_rank_for_log(self) -> bool:
        return self.global_rank == 0

    def describe(self) -> dict[str, dict[str, Any]]:
        """Sizes / local ranks / members of every mode, for logs and tests."""
        return {
            mode.name: {
                "local_rank": self.get_local_rank(mode),
                "world_size": self.get_world_size(mode),
                "ranks": self.get_ranks_in_group(mode),
            }
            for mode in ParallelMode
        }


gpc = ParallelContext()


# -- packed batch publication ------------------------------------------------------------

_PACKED_KEY = re.compile(r"^(cu_seqlens|max_seqlen)_data_rank\d+$")


def set_packed_batch(cu_seqlens, max_seqlen: int | None = None, *, device=None) -> None:
    """Publish this rank's pack where patched models look for it.

    Writes ``use_packed_dataset=True``, ``cu_seqlens_data_rank{r}`` and
    ``max_seqlen_data_rank{r}`` with r = this rank's DATA rank (0 with no runtime).
    ``cu_seqlens`` are the GLOBAL boundaries of the (sequence-parallel padded) pack.
    """
    import torch

    from .attention import remember_host_values
    from .distributed import to_device

    if not torch.is_tensor(cu_seqlens):
        cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.int32)
    host_values = cu_seqlens.tolist() if cu_seqlens.device.type == "cpu" else None
    if device is not None:
        cu_seqlens = to_device(cu_seqlens, device)
        if host_values is not None and cu_seqlens.device.type != "cpu":
            remember_host_values(cu_seqlens, host_values)
    if max_seqlen is None:
        values = host_values if host_values is not None else cu_seqlens.tolist()
        max_seqlen = max((b - a for a, b in zip(values, values[1:])), default=0)
    rank = gpc.get_local_rank(ParallelMode.DATA)
    data = gpc.config.data
    data["use_packed_dataset"] = True
    data[f"cu_seqlens_data_rank{rank}"] = cu_seqlens
    data[f"max_seqlen_data_rank{rank}"] = int(max_seqlen)


def clear_packed_batch() -> None:
    """Remove every packed-batch key: patched models go back to the padded path."""
    data = gpc.config.data
    for key in [k for k in data if k == "use_packed_dataset" or _PACKED_KEY.match(k)]:
        del data[key]


@contextlib.contextmanager
def packed_batch(cu_seqlens, max_seqlen: int | None = None, *, device=None) -> Iterator[None]:
    """``set_packed_batch`` for the duration of a block; earlier keys come back after."""
    data = gpc.config.data
    saved = {k: v for k, v in data.items() if k == "use_packed_dataset" or _PACKED_KEY.match(k)}
    set_packed_batch(cu_seqlens, max_seqlen, device=device)
    try:
        yield
    finally:
        clear_packed_batch()
        data.update(saved)
