"""The pin store: the upstream releases an entry has a patch for, where each patch lives, and its header.

One naming scheme, for reading and writing alike. A patch belongs to its *owner*: the entry
itself, or the entry whose patch it reuses (Yi and InternLM1 reuse llama2's: same upstream file).

- the manifest pin: ``<owner's zoo dir>/internevo.patch`` (the seed's ``patch modeling_x.py internevo.patch``)
- any other pin:    ``patches/<owner>/<package>-<version>.patch``
- ``hfpatch refresh`` writes ``<that path>.candidate`` (or ``<package>-<version>.conflicts.py``) beside
  it; dropping ``.candidate`` makes it a pin of every entry that shares the patch.

A patch may start with a DEP-3 header: ``Field: value`` lines (indented continuation lines) before the
first ``--- `` line, which GNU patch skips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from hfpatch import files, patching, upstream, zoo
from hfpatch.zoo import Entry, ZooError

DEFAULT_PATCH = "internevo.patch"
CANDIDATE_SUFFIX = ".candidate"
HEADER_FIELD = re.compile(r"^([A-Za-z][\w-]*):[ \t]*(.*)$")
# DEP-3: Origin may start with one of these keywords, then ", "; hfpatch always writes one
ORIGIN = re.compile(r"^(upstream|backport|vendor|other), \S")


@dataclass(frozen=True)
class Pin:
    """One upstream release an entry supports: its patch and the sha256 its files must have."""

    version: str | None
    patch: Path | None
    hashes: dict[str, str]


# --------------------------------------------------------------------------- where patches live


def patch_owner(entry: Entry, entries: list[Entry] | None = None) -> Entry:
    """The entry whose patch ``entry`` applies: itself, or the one its manifest's ``patch.reuse`` names."""
    chain = [entry.name]
    while entry.patch_from:
        entry = zoo.resolve(entry.patch_from, entries)
        if entry.name in chain:
            raise ZooError(f"patch.reuse goes round in a circle: {' -> '.join([*chain, entry.name])}")
        chain.append(entry.name)
    return entry


def default_patch_path(entry: Entry, entries: list[Entry] | None = None) -> Path:
    """The manifest pin's patch, in the owner's zoo dir."""
    if not entry.has_patch:
        raise ZooError(f"{entry.name} has no patch yet ({entry.notes or 'planned'})")
    return patch_owner(entry, entries).directory / DEFAULT_PATCH


def versioned_patch_path(entry: Entry, version: str, entries: list[Entry] | None = None) -> Path:
    """Where the patch for another pin (``version`` of the entry's package) lives."""
    owner = patch_owner(entry, entries)
    return zoo.zoo_root().parent / "patches" / owner.name / f"{entry.upstream.package}-{version}.patch"


def candidate_path(entry: Entry, version: str, entries: list[Entry] | None = None) -> Path:
    path = versioned_patch_path(entry, version, entries)
    return path.with_name(path.name + CANDIDATE_SUFFIX)


def conflicts_path(entry: Entry, version: str, entries: list[Entry] | None = None) -> Path:
    return versioned_patch_path(entry, version, entries).with_suffix(".conflicts.py")


def read_patch(path: Path) -> str:
    """A patch file's text, checked to parse: a bad file fails as one line naming it."""
    data = files.read_bytes(path)
    try:
        patching.parse_patch(data)
    except patching.PatchError as exc:
        raise patching.PatchError(f"{path}: {exc}") from None
    return data.decode("utf-8")


# --------------------------------------------------------------------------- which pins an entry has


def manifest_pin(entry: Entry, entries: list[Entry] | None = None) -> Pin:
    """The pin ``model.toml`` names, with the sha256 of every upstream file."""
    up = entry.upstream
    return Pin(up.version, default_patch_path(entry, entries) if entry.has_patch else None, dict(up.files))


def supported(entry: Entry, entries: list[Entry] | None = None) -> dict[str, Pin]:
    """The manifest pin, then one pin per ``patches/<owner>/<package>-<version>.patch``, by version."""
    up = entry.upstream
    default = manifest_pin(entry, entries)
    found = {up.version: default}
    if not entry.has_patch or up.kind != "package":
        return found
    pattern = versioned_patch_path(entry, "*", entries)
    prefix = f"{up.package}-"
    for path in sorted(pattern.parent.glob(pattern.name)):
        version = path.name[len(prefix):-len(".patch")]
        if version == up.version:
            raise ZooError(f"{path} is a second patch for the manifest pin {up.version} (its patch is "
                           f"{default.patch}); remove one")
        pre_image = read_header(read_patch(path)).get("pre-image-sha256")
        if not pre_image:
            raise ZooError(f"{path}: a patch for another pin needs a Pre-Image-SHA256 header field")
        found[version] = Pin(version, path, {entry.patch_target: pre_image})
    return found


def active_pin(entry: Entry, entries: list[Entry] | None = None) -> Pin:
    """The pin matching the installed package when the entry has a patch for it, else the manifest pin."""
    available = supported(entry, entries)
    installed = upstream.installed_version(entry.upstream.package) if entry.upstream.kind == "package" else None
    return available.get(installed, available[entry.upstream.version])


def pin_label(entry: Entry, pin: Pin) -> str:
    return f"{entry.upstream.package}=={pin.version}" if entry.upstream.kind == "package" else "the first-party port"


# --------------------------------------------------------------------------- DEP-3 header


def read_header(text: str) -> dict[str, str]:
    """Header fields by lower-cased name; a value's continuation lines are joined with newlines."""
    fields: dict[str, str] = {}
    name = None
    for line in text.split("\n"):
        if line.startswith("--- "):
            break
        match = HEADER_FIELD.match(line)
        if match:
            name = match.group(1).lower()
            fields[name] = match.group(2).strip()
        elif name and line[:1] in (" ", "\t") and line.strip():
            fields[name] += "\n" + line.strip()
        else:
            name = None
    return fields


def render_header(fields: dict[str, str]) -> str:
    """DEP-3 text for ``fields`` (a value's newlines become continuation lines), ending in a blank line."""
    return "".join(f"{name}: {value.replace(chr(10), chr(10) + ' ')}\n" for name, value in fields.items()) + "\n"


def new_header(description: str, origin: str, pin: str, pre_image: bytes, post_image: bytes) -> dict[str, str]:
    """The fields of a patch hfpatch writes; ``origin`` without its DEP-3 keyword (``vendor``: ours)."""
    return {
        "Description": description,
        "Origin": f"vendor, {origin}",
        "Pin": pin,
        "Pre-Image-SHA256": upstream.sha256_bytes(pre_image),
        "Post-Image-SHA256": upstream.sha256_bytes(post_image),
        "Last-Update": date.today().isoformat(),
    }


def header_problems(fields: dict[str, str]) -> list[str]:
    """What a header lacks of DEP-3 as the zoo writes it (Description, keyword Origin, Last-Update)."""
    problems = []
    if "description" not in fields and "subject" not in fields:
        problems.append("no Description: field")
    if not ORIGIN.match(fields.get("origin", "")):
        problems.append("Origin: must start with a DEP-3 keyword (upstream, backport, vendor or other) and ', '")
    if not _is_iso_date(fields.get("last-update", "")):
        problems.append("Last-Update: must be a YYYY-MM-DD date")
    return problems


def _is_iso_date(text: str) -> bool:
    try:
        return date.fromisoformat(text).isoformat() == text  # exactly YYYY-MM-DD, not 20261127 or a week date
    except ValueError:
        return False
