"""Engine flavours of a patch: only the import block differs.

Committed patches import the InternEvo-compatible API from ``hfpatch.runtime``;
the ``internevo`` flavour imports the same names from InternEvo itself, for users
who run InternEvo's own trainer. The blocks map line for line, so hunk counts
are unchanged by rendering.
"""

from __future__ import annotations

from hfpatch.errors import UserError

ENGINE_IMPORTS = {
    "hfpatch": [
        "from hfpatch.runtime import ParallelMode",
        "from hfpatch.runtime import gpc",
        "from hfpatch.runtime import isp_flash_attn_varlen_func, isp_flash_attn_func",
        "from hfpatch.runtime import normal_, scaled_init_method_normal",
    ],
    "internevo": [
        "from internlm.core.context import ParallelMode",
        "from internlm.core.context import global_context as gpc",
        "from internlm.model.ops.attention import isp_flash_attn_varlen_func, isp_flash_attn_func",
        "from internlm.initialize.initialize_tensor import normal_, scaled_init_method_normal",
    ],
}
DEFAULT_ENGINE = "hfpatch"


class EngineError(UserError):
    """An unknown engine, or a patch that cannot be rendered for one."""


def render(patch_text: str, engine: str) -> str:
    """The committed (hfpatch-flavoured) patch text rewritten for ``engine``."""
    if engine not in ENGINE_IMPORTS:
        raise EngineError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_IMPORTS)}")
    lines = patch_text.split("\n")
    for ours, theirs in zip(ENGINE_IMPORTS[DEFAULT_ENGINE], ENGINE_IMPORTS[engine]):
        if f"+{ours}" not in lines:
            raise EngineError(f"the patch lacks the runtime import line {ours!r}; cannot render engine {engine!r}")
        lines = [f"+{theirs}" if line == f"+{ours}" else line for line in lines]
    return "\n".join(lines)
