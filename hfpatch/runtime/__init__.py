"""hfpatch runtime: the InternEvo-compatible API that patched modeling files import.

    from hfpatch.runtime import ParallelMode, gpc, isp_flash_attn_varlen_func, ...

With nothing initialised everything answers as one process and patched models
behave like the unpatched ones. See ``distributed`` for the mesh layout.
"""

from .attention import (
    BACKENDS,
    AttentionBackendError,
    available_backends,
    backend_problem,
    backend_unavailable_reason,
    dense_attention,
    explain_backends,
    resolve_backend,
    validate_cu_seqlens,
    varlen_attention,
)
from .context import (
    Config,
    ParallelContext,
    ParallelMode,
    clear_packed_batch,
    gpc,
    packed_batch,
    set_packed_batch,
)
from .distributed import current_device, destroy, initialize, parallel_context, to_device
from .init import normal_, scaled_init_method_normal
from .isp import all_to_all, isp_flash_attn_func, isp_flash_attn_varlen_func
from .linear_cross_entropy import fused_loss_kernel
from .loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    chunked_causal_lm_loss,
    count_valid_tokens,
    fused_linear_causal_lm_loss,
    global_loss,
)
from .packing import (
    PackedRow,
    PackResult,
    build_packed_row,
    concat_rows,
    pack_documents,
    pad_documents,
    pad_pack_to_multiple,
    shard_for_sequence_parallel,
)
from .swiglu import swiglu_mlp, swiglu_mlp_kernel
from .weight_parallel import apply_weight_parallel, find_decoder_layers, weight_parallel_mesh

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "AttentionBackendError",
    "Config",
    "PackResult",
    "PackedRow",
    "ParallelContext",
    "ParallelMode",
    "all_to_all",
    "apply_weight_parallel",
    "available_backends",
    "backend_problem",
    "backend_unavailable_reason",
    "build_packed_row",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "clear_packed_batch",
    "concat_rows",
    "count_valid_tokens",
    "current_device",
    "dense_attention",
    "destroy",
    "explain_backends",
    "find_decoder_layers",
    "fused_linear_causal_lm_loss",
    "fused_loss_kernel",
    "global_loss",
    "gpc",
    "initialize",
    "isp_flash_attn_func",
    "isp_flash_attn_varlen_func",
    "normal_",
    "pack_documents",
    "packed_batch",
    "pad_documents",
    "pad_pack_to_multiple",
    "parallel_context",
    "resolve_backend",
    "scaled_init_method_normal",
    "set_packed_batch",
    "shard_for_sequence_parallel",
    "swiglu_mlp",
    "swiglu_mlp_kernel",
    "to_device",
    "validate_cu_seqlens",
    "varlen_attention",
    "weight_parallel_mesh",
]
