"""The model zoo: manifest schema, registry and name resolution."""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hfpatch import files
from hfpatch.errors import UserError

MANIFEST = "model.toml"
PATCH_STATES = ("ready", "planned")


class ZooError(UserError):
    """A manifest that does not validate, or a model name that resolves to nothing."""


@dataclass(frozen=True)
class Upstream:
    kind: str  # "package" (materialized from a pinned wheel) or "port" (first-party file in the zoo dir)
    package: str | None
    version: str | None
    path: str | None  # directory inside the package, e.g. "models/llama"
    files: dict[str, str]  # file name -> sha256 of the materialized bytes


@dataclass(frozen=True)
class Entry:
    name: str
    directory: Path
    seed_name: str
    aliases: tuple[str, ...]
    family: str
    description: str
    upstream: Upstream
    patch_state: str  # "ready" | "planned"
    patch_target: str | None  # file the patch modifies
    patch_from: str | None  # name of the entry whose patch this one reuses (same upstream file)
    capabilities: dict[str, bool]
    model_class: str | None = None  # class in the patch target that training builds
    # official checkpoint config.json key -> our config attribute (e.g. InternLM1's "bias" -> "attention_bias")
    checkpoint_config_keys: dict = field(default_factory=dict, hash=False)
    test_config: dict = field(default_factory=dict, hash=False)
    # how the conformance suite (tests/test_conformance.py) checks this entry: reference class, ISP layouts, ...
    test: dict = field(default_factory=dict, hash=False)
    known_good_pins: tuple[str, ...] = ()
    notes: str = ""

    @property
    def has_patch(self) -> bool:
        return self.patch_state == "ready"

    @property
    def relative_dir(self) -> str:
        return str(self.directory.relative_to(zoo_root().parent))


def zoo_root() -> Path:
    """The ``huggingface_model`` directory: $HFPATCH_ZOO, else the one beside the package."""
    configured = os.environ.get("HFPATCH_ZOO")
    root = Path(configured) if configured else Path(__file__).resolve().parent.parent / "huggingface_model"
    if not root.is_dir():
        raise ZooError(f"model zoo not found at {root}; install hfpatch from a checkout (pip install -e .) or set HFPATCH_ZOO")
    return root


def _require(table: dict, key: str, where: str):
    if key not in table:
        raise ZooError(f"{where}: missing required key {key!r}")
    return table[key]


def load_entry(manifest_path: Path) -> Entry:
    where = str(manifest_path)
    try:
        data = tomllib.loads(files.read_bytes(manifest_path).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ZooError(f"{where}: {exc}") from None
    known = {"name", "seed_name", "aliases", "family", "description", "model_class", "upstream", "patch", "capabilities",
             "checkpoint",
             "test_config", "test", "known_good_pins", "notes"}
    unknown = set(data) - known
    if unknown:
        raise ZooError(f"{where}: unknown keys {sorted(unknown)}")
    up = _require(data, "upstream", where)
    kind = up.get("kind", "package")
    if kind not in ("package", "port"):
        raise ZooError(f"{where}: upstream.kind must be 'package' or 'port', not {kind!r}")
    if kind == "package":
        for key in ("package", "version", "path"):
            _require(up, key, f"{where} [upstream]")
    upstream = Upstream(kind, up.get("package"), up.get("version"), up.get("path"), dict(up.get("files", {})))
    patch = _require(data, "patch", where)
    state = _require(patch, "state", f"{where} [patch]")
    if state not in PATCH_STATES:
        raise ZooError(f"{where}: patch.state must be one of {PATCH_STATES}, not {state!r}")
    target = patch.get("target")
    if state == "ready" and target not in upstream.files:
        raise ZooError(f"{where}: patch.target {target!r} is not one of the upstream files {sorted(upstream.files)}")
    return Entry(
        name=_require(data, "name", where),
        directory=manifest_path.parent,
        seed_name=_require(data, "seed_name", where),
        aliases=tuple(data.get("aliases", ())),
        family=_require(data, "family", where),
        description=data.get("description", ""),
        upstream=upstream,
        patch_state=state,
        patch_target=target,
        patch_from=patch.get("reuse"),
        capabilities={k: bool(v) for k, v in data.get("capabilities", {}).items()},
        model_class=data.get("model_class"),
        checkpoint_config_keys=dict(data.get("checkpoint", {}).get("config_keys", {})),
        test_config=dict(data.get("test_config", {})),
        test=dict(data.get("test", {})),
        known_good_pins=tuple(data.get("known_good_pins", ())),
        notes=data.get("notes", ""),
    )


def load_zoo(root: Path | None = None) -> list[Entry]:
    root = root or zoo_root()
    entries = sorted((load_entry(path) for path in root.rglob(MANIFEST)), key=lambda e: e.name)
    names: dict[str, str] = {}
    for entry in entries:
        for key in _keys(entry):
            if key in names and names[key] != entry.name:
                raise ZooError(f"name {key!r} is claimed by both {names[key]} and {entry.name}")
            names[key] = entry.name
    by_name = {e.name: e for e in entries}
    for entry in entries:
        if entry.patch_from and entry.patch_from not in by_name:
            raise ZooError(f"{entry.name}: patch.reuse names unknown entry {entry.patch_from!r}")
    return entries


def _keys(entry: Entry) -> set[str]:
    return {k.lower() for k in (entry.name, entry.seed_name, entry.relative_dir, *entry.aliases)}


def resolve(name: str, entries: list[Entry] | None = None) -> Entry:
    """Find an entry by zoo name, seed name, path or alias, case-insensitively."""
    entries = entries if entries is not None else load_zoo()
    wanted = name.strip().rstrip("/").lower()
    for entry in entries:
        if wanted in _keys(entry):
            return entry
    candidates = sorted({k for e in entries for k in (e.name.lower(), *(a.lower() for a in e.aliases))})
    close = difflib.get_close_matches(wanted, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known models: {', '.join(e.name for e in entries)}"
    raise ZooError(f"unknown model {name!r}{hint}")
