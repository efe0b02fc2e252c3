"""Import a zoo entry's patched modeling file and build models from it."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from hfpatch import actions, engines, files, patching, pins, upstream, zoo
from hfpatch.zoo import Entry

def patched_copy(entry: Entry, entries: list[Entry] | None = None) -> Path:
    """A directory holding the entry's pinned files with the patch applied, keyed by their content.

    Built in hfpatch's cache from the pinned upstream bytes, never from the zoo checkout: training
    leaves the user's files as they are (`hfpatch status` is unchanged) and the same bytes are
    imported whatever state the zoo files are in.
    """
    pin = pins.active_pin(entry, entries)
    contents = {name: actions.pinned_bytes(entry, name, pin) for name in sorted(pin.hashes)}
    (file_patch,) = patching.parse_patch(actions.patch_text(entry, engines.DEFAULT_ENGINE, entries, pin))
    planned = patching.plan_file(entry.patch_target, contents[entry.patch_target], file_patch)
    contents[entry.patch_target] = planned.new_bytes
    digest = hashlib.sha256()
    for name, data in contents.items():
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    directory = files.cache_dir() / "patched" / f"{entry.name}-{digest.hexdigest()[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        path = directory / name
        if not path.is_file() or files.read_bytes(path) != data:
            files.atomic_write(path, data)
    return directory


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


def import_file(name: str, path: Path) -> ModuleType:
    """The Python file ``path`` imported as module ``name`` (once: later calls return that module)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_patched_module(entry: Entry, entries: list[Entry] | None = None) -> ModuleType:
    """The patched modeling module, imported from :func:`patched_copy` under a private name."""
    check_installed_pin(entry, entries)
    name = f"hfpatch_zoo.{entry.name}.{entry.patch_target.removesuffix('.py')}"
    if name in sys.modules:
        return sys.modules[name]
    module = import_file(name, patched_copy(entry, entries) / entry.patch_target)
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
