"""Import a zoo entry's patched modeling file and build models from it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from hfpatch import actions, pins, upstream, zoo
from hfpatch.zoo import Entry

def ensure_patched(entry: Entry, entries: list[Entry] | None = None) -> None:
    """Sync and apply the hfpatch-engine patch if the zoo file is not patched yet."""
    state = actions.file_state(entry, entry.patch_target, entries).state
    if state == "patched":
        return
    if state.startswith("patched"):
        raise actions.ActionError(f"{entry.name}: the zoo file is {state}; `hfpatch revert {entry.name}` first")
    actions.apply(entry, entries=entries)


def check_installed_pin(entry: Entry, entries: list[Entry] | None = None) -> None:
    """The installed package must be a release the entry has a patch for."""
    up = entry.upstream
    if up.kind != "package":
        return
    installed = upstream.installed_version(up.package)
    supported = pins.supported(entry, entries)
    if installed not in supported:
        raise zoo.ZooError(f"{entry.name}: installed {up.package} {installed} has no patch; "
                           f"supported releases: {', '.join(sorted(supported))}")


def load_patched_module(entry: Entry, entries: list[Entry] | None = None) -> ModuleType:
    """The patched modeling module, imported from the zoo dir under a private name."""
    check_installed_pin(entry, entries)
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
    if entry.upstream.package == "transformers":
        share_checkpoint_conversions(module)
    return module


def share_checkpoint_conversions(module: ModuleType) -> None:
    """Give the patched classes transformers' checkpoint key conversions for their model types.

    transformers 5.x converts official checkpoints on load (LLaVA's legacy key layout, Mixtral's
    per-expert weights into fused tensors) but skips that for classes defined outside its own
    package, so a patched class would load those checkpoints with missing weights left random.
    Registering the library's own mappings (unchanged) under the same names turns them back on.
    transformers 4.x keeps its conversions on the classes themselves: nothing to do.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return
    for obj in vars(module).values():
        if not (isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == module.__name__):
            continue
        for key in (obj.__name__, getattr(obj.config_class, "model_type", None)):
            mapping = get_checkpoint_conversion_mapping(key) if key else None
            if mapping is not None:
                register_checkpoint_conversion_mapping(key, mapping, overwrite=True)


def model_class(entry: Entry, entries: list[Entry] | None = None) -> type:
    """The patched class the trainer builds (manifest key ``model_class``)."""
    if not entry.model_class:
        raise zoo.ZooError(f"{entry.name}: the manifest names no model_class")
    module = load_patched_module(entry, entries)
    if not hasattr(module, entry.model_class):
        raise zoo.ZooError(f"{entry.name}: {entry.patch_target} defines no class {entry.model_class}")
    return getattr(module, entry.model_class)


def tiny_config(entry: Entry, entries: list[Entry] | None = None, **overrides):
    """The manifest's tiny test config: the model class's own config object, or a plain dict for
    diffusers models, which build with ``from_config``."""
    values = {**entry.test_config, **overrides}
    values.pop("model_type", None)
    config_class = getattr(model_class(entry, entries), "config_class", None)
    return values if config_class is None else config_class(**values)


def build_model(entry: Entry, config=None, entries: list[Entry] | None = None):
    """A randomly initialised patched model from ``config`` (default: the tiny test config)."""
    cls = model_class(entry, entries)
    config = tiny_config(entry, entries) if config is None else config
    return cls.from_config(config) if isinstance(config, dict) else cls(config)
