"""``--engine internevo``: every rendered patch imports and calls InternEvo's API as InternEvo defines it.

InternEvo does not install here (DESIGN.md, section 6), so a stub ``internlm`` package stands in: the
modules, names and call signatures of InternEvo's develop branch (checked at commit 6bacd64e, the API
the README names). The rendered modeling file is imported against it (the imports resolve), and every
call of an InternEvo function in it is bound to the stub's signature (the calls would bind).
"""

import ast
import importlib.util
import inspect
import sys

import pytest

from hfpatch import actions, zoo

STUB = {
    "internlm/__init__.py": "",
    "internlm/core/__init__.py": "",
    "internlm/core/context/__init__.py": '''
from enum import Enum


class ParallelMode(Enum):
    GLOBAL = "global"
    DATA = "data"
    MODEL = "model"
    PIPELINE = "pipe"
    TENSOR = "tensor"
    ZERO1 = "zero1"
    NETTEST = "nettest"
    ZERO3_DP = "zero3_dp"
    EXPERT = "expert"
    EXPERT_DATA = "expert_data"
    DUMMY = "dummy"
    WEIGHT = "weight"


class Config(dict):
    __getattr__ = dict.__getitem__


class ParallelContext:
    def __init__(self):
        self.config = Config(data=Config(use_packed_dataset=False))

    def get_global_rank(self):
        return 0

    def get_local_rank(self, parallel_mode):
        return 0

    def get_world_size(self, parallel_mode):
        return 1

    def get_group(self, parallel_mode):
        return None


global_context = ParallelContext()
''',
    "internlm/model/__init__.py": "",
    "internlm/model/ops/__init__.py": "",
    "internlm/model/ops/attention.py": '''
def isp_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                               softmax_scale=None, attention_dropout=0.0, return_attn_probs=False):
    raise NotImplementedError("stub")


def isp_flash_attn_func(q, k, v, causal=False, softmax_scale=None, attention_dropout=0.0, return_attn_probs=False):
    raise NotImplementedError("stub")
''',
    "internlm/initialize/__init__.py": "",
    "internlm/initialize/initialize_tensor.py": '''
def scaled_init_method_normal(sigma: float = 1.0, num_layers: int = 1):
    raise NotImplementedError("stub")


def normal_(mean: float = 0.0, std: float = 1.0):
    raise NotImplementedError("stub")
''',
}
INTERNEVO_FUNCTIONS = ("isp_flash_attn_varlen_func", "isp_flash_attn_func", "normal_", "scaled_init_method_normal")
# one entry per patched file (internlm1 and yi share llama2's)
MODELS = ["llama2", "qwen2", "mixtral", "internlm2", "baichuan2", "llava", "mamba", "flux"]


@pytest.fixture
def internevo_stub(tmp_path, monkeypatch):
    """The stub on sys.path; afterwards transformers' attention registry as it was (LLaVA's patch registers
    its attention there on import: the stub-bound one must not outlive the test)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, text in STUB.items():
        path = tmp_path / "stub" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    registered = dict(ALL_ATTENTION_FUNCTIONS.items())
    yield
    for key, function in registered.items():
        type(ALL_ATTENTION_FUNCTIONS).register(key, function)
    for name in [m for m in sys.modules if m == "internlm" or m.startswith("internlm.")]:
        del sys.modules[name]


def _calls(tree: ast.AST, module) -> list[tuple[ast.Call, str, object]]:
    """(call, name, the object it calls) for each call of an InternEvo function or a gpc method."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in INTERNEVO_FUNCTIONS:
            found.append((node, func.id, getattr(module, func.id)))
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "gpc":
            found.append((node, f"gpc.{func.attr}", getattr(module.gpc, func.attr)))
    return found


@pytest.mark.parametrize("name", MODELS)
def test_rendered_patch_imports_and_calls_bind_to_internevo(zoo_copy, internevo_stub, monkeypatch, name):
    entry = zoo.resolve(name)
    actions.sync(entry)
    actions.apply(entry, engine="internevo")
    path = entry.directory / entry.patch_target
    source = path.read_text()
    assert "hfpatch.runtime" not in source
    spec = importlib.util.spec_from_file_location(f"internevo_rendered_{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # every `from internlm... import ...` resolves against the stub
    assert module.gpc is sys.modules["internlm.core.context"].global_context
    tree = ast.parse(source)
    calls = _calls(tree, module)
    assert {called for _, called, _ in calls} >= {"isp_flash_attn_varlen_func", "gpc.get_world_size"} or name == "mamba"
    for node, called, target in calls:
        args = [object() for a in node.args if not isinstance(a, ast.Starred)]
        kwargs = {kw.arg: object() for kw in node.keywords if kw.arg is not None}  # a **mapping binds at run time
        try:
            inspect.signature(target).bind(*args, **kwargs)
        except TypeError as exc:
            pytest.fail(f"{path.name}:{node.lineno}: {called}({ast.unparse(node)[len(called) + 1:]} does not bind to "
                        f"InternEvo's signature {inspect.signature(target)}: {exc}")
    modes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "ParallelMode"}
    assert modes and modes <= set(module.ParallelMode.__members__)
