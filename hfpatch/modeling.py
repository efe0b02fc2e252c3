"""Import a zoo entry's patched modeling file and build models from it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from hfpatch import actions, zoo
from hfpatch.zoo import Entry

CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM"}


def ensure_patched(entry: Entry, entries: list[Entry] | None = None) -> None:
    """Sync and apply the hfpatch-engine patch if the zoo file is not patched yet."""
    state = actions.file_state(entry, entry.patch_target, entries).state
    if state == "patched":
        return
    if state.startswith("patched"):
        raise actions.ActionError(f"{entry.name}: the zoo file is {state}; `hfpatch revert {entry.name}` first")
    actions.apply(entry, entries=entries)


def load_patched_module(entry: Entry, entries: list[Entry] | None = None) -> ModuleType:
    """The patched modeling module, imported from the zoo dir under a private name."""
    ensure_patched(entry, entries)
    name = f"hfpatch_zoo.{entry.name}.{entry.patch_target.removesuffix('.py')}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, entry.directory / entry.patch_target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def causal_lm_class(entry: Entry, entries: list[Entry] | None = None) -> type:
    model_type = entry.test_config.get("model_type")
    if model_type not in CAUSAL_LM_CLASSES:
        raise zoo.ZooError(f"{entry.name}: no causal-LM class known for model_type {model_type!r}")
    return getattr(load_patched_module(entry, entries), CAUSAL_LM_CLASSES[model_type])


def tiny_config(entry: Entry, **overrides):
    """The manifest's tiny test config as a transformers config object."""
    from transformers import AutoConfig

    values = {**entry.test_config, **overrides}
    return AutoConfig.for_model(values.pop("model_type"), **values)
