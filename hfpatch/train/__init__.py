"""The hfpatch trainer: one training loop for every zoo model that has a patch.

``hfpatch train MODEL`` (``command.train``) -> ``config.resolve_config`` ->
``loop.run_training``, which asks the entry's family (``families``: causal LM, LLaVA, Flux;
each owns its model config, data, micro-batches, loss and FLOPs) for its workload and wires
together data (``sources``, ``corpus``, ``tokenizer``, ``dataset``, ``batches``, with
``multimodal`` / ``llava_data`` for LLaVA and ``diffusion`` / ``flux_data`` for Flux), the
model (``build``, ``parallelize`` with ``weight_copy``, ``output_head`` for the chunked and fused losses), the
memory levers (``levers``, ``offload``, ``tiling``), the update (``optim``, ``step``) and the
run's outputs (``checkpoint``, ``export``, ``metrics``, ``progress``).
"""

from .config import TrainConfig, resolve_config
from .errors import ConfigError, DataError, NonFiniteLossError, TrainError

__all__ = ["ConfigError", "DataError", "NonFiniteLossError", "TrainConfig", "TrainError", "resolve_config", "run_training"]


def run_training(cfg: TrainConfig):
    """See :func:`hfpatch.train.loop.run_training` (imported on first use: it loads torch)."""
    from .loop import run_training as run

    return run(cfg)
