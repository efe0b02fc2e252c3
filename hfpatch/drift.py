"""How a zoo patch fares on other upstream releases, and rebasing it onto one."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from hfpatch import actions, engines, files, patching, pins, upstream
from hfpatch.errors import UserError
from hfpatch.zoo import Entry

VERSION_LINE = re.compile(r"Available versions:\s*(.*)")


class DriftError(UserError):
    """Releases that cannot be listed, or a refresh that cannot be made."""


@dataclass
class DriftResult:
    model: str
    package: str
    version: str
    state: str  # pin | identical | clean | offsets | fails | missing | error
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", version))


def release_versions(package: str, latest: int | None = None, major: str | None = None) -> list[str]:
    """Final releases of ``package`` on the index, newest first (``pip index versions``)."""
    done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                          capture_output=True, text=True)
    match = VERSION_LINE.search(done.stdout)
    if done.returncode != 0 or not match:
        raise DriftError(f"cannot list releases of {package}: {(done.stderr or done.stdout).strip()[-300:]}")
    versions = [v.strip() for v in match.group(1).split(",") if re.fullmatch(r"[\d.]+", v.strip())]
    if major is not None:
        versions = [v for v in versions if v.split(".")[0] == major]
    versions.sort(key=_version_key, reverse=True)
    return versions[:latest] if latest else versions


def check_version(entry: Entry, version: str, entries: list[Entry] | None = None) -> DriftResult:
    """Apply the entry's pinned patch (dry run) to ``version``'s upstream file."""
    up = entry.upstream
    result = DriftResult(entry.name, up.package, version, "error")
    if version == up.version:
        result.state, result.detail = "pin", "the pinned release"
        return result
    try:
        data = upstream.materialize(up.package, version, f"{up.path}/{entry.patch_target}")
    except upstream.UpstreamError as exc:
        result.state = "missing" if "has no file" in str(exc) else "error"
        result.detail = str(exc)
        return result
    pin = pins.manifest_pin(entry, entries)
    if data == actions.pinned_bytes(entry, entry.patch_target, pin):
        result.state, result.detail = "identical", "same bytes as the pin"
        return result
    [file_patch] = patching.parse_patch(actions.patch_text(entry, engines.DEFAULT_ENGINE, entries, pin))
    try:
        planned = patching.plan_file(entry.patch_target, data, file_patch)
    except patching.HunkFailed as exc:
        result.state, result.detail = "fails", f"hunk #{exc.hunk.number} {exc.hunk.header}"
        return result
    except patching.PatchError as exc:
        result.state, result.detail = "fails", str(exc).splitlines()[0]
        return result
    if planned.offsets:
        result.state = "offsets"
        result.detail = ", ".join(f"hunk #{n} {o:+d}" for n, o in sorted(planned.offsets.items()))
    else:
        result.state, result.detail = "clean", "file differs, patch applies exactly"
    return result


def drift(entries: list[Entry], versions: list[str], all_entries: list[Entry] | None = None, progress=None):
    """Every (entry, version) pair; ``progress`` is called after each."""
    results = []
    for entry in entries:
        if not entry.has_patch or entry.upstream.kind != "package":
            continue
        for version in versions:
            results.append(check_version(entry, version, all_entries))
            if progress:
                progress(results[-1])
    return results


# --------------------------------------------------------------------------- refresh


@dataclass
class Refresh:
    candidate: Path
    conflicts: int
    merged_file: Path | None  # the merged upstream file with conflict markers, when conflicts > 0
    owner: str  # the entry whose patch was rebased: the entry itself, or the one whose patch it reuses


def make_patch_text(file_name: str, before: bytes, after: bytes, description: str, origin: str, pin: str) -> str:
    """A zoo-style patch (DEP-3 header + ``diff -u`` body) from two versions of one file."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.write_bytes(before)
        b.write_bytes(after)
        done = subprocess.run(["diff", "-u", str(a), str(b)], capture_output=True)
    if done.returncode not in (0, 1):
        raise DriftError(f"diff failed: {done.stderr.decode(errors='replace')}")
    body = done.stdout.decode().split("\n", 2)[2]
    header = pins.render_header(pins.new_header(description, origin, pin, before, after))
    return f"{header}--- {file_name}\n+++ {file_name}\n{body}"


def refresh(entry: Entry, version: str, force: bool = False, entries: list[Entry] | None = None) -> Refresh:
    """Three-way merge (pin upstream, patched pin, new upstream) into a candidate patch for ``version``.

    The candidate is written where the pin store reads the patch for ``version`` once ``.candidate``
    is dropped: beside the owner's other pins, shared by every entry that reuses the patch.
    """
    if not entry.has_patch or entry.upstream.kind != "package":
        raise DriftError(f"{entry.name}: only package entries with a patch can be refreshed")
    up = entry.upstream
    if version == up.version:
        raise DriftError(f"{version} is {entry.name}'s manifest pin; its patch is {pins.default_patch_path(entry, entries)}")
    pin = pins.manifest_pin(entry, entries)
    base = actions.pinned_bytes(entry, entry.patch_target, pin)
    [file_patch] = patching.parse_patch(actions.patch_text(entry, engines.DEFAULT_ENGINE, entries, pin))
    ours = patching.plan_file(entry.patch_target, base, file_patch).new_bytes
    theirs = upstream.materialize(up.package, version, f"{up.path}/{entry.patch_target}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / name for name in ("ours", "base", "theirs")}
        for name, data in (("ours", ours), ("base", base), ("theirs", theirs)):
            paths[name].write_bytes(data)
        done = subprocess.run(["git", "merge-file", "-p", "-L", "patched pin", "-L", f"pin {up.version}",
                               "-L", f"{up.package} {version}", str(paths["ours"]), str(paths["base"]),
                               str(paths["theirs"])], capture_output=True)
    if done.returncode < 0 or done.returncode > 127:
        raise DriftError(f"git merge-file failed: {done.stderr.decode(errors='replace')}")
    merged, conflicts = done.stdout, done.returncode
    owner = pins.patch_owner(entry, entries)
    if conflicts:
        candidate = pins.conflicts_path(entry, version, entries)
        text = merged
    else:
        candidate = pins.candidate_path(entry, version, entries)
        text = make_patch_text(
            entry.patch_target, theirs, merged,
            f"{owner.name} InternEvo patch rebased onto {up.package} {version} (review before use)",
            f"hfpatch refresh of {owner.name}'s {up.package} {up.version} patch",
            f"{up.package}=={version} {up.package}/{up.path}/{entry.patch_target} (imports made absolute)").encode()
    if candidate.exists() and not force:
        raise DriftError(f"{candidate} exists; review or remove it, or pass --force")
    try:
        candidate.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise files.os_error(exc, candidate.parent, "create") from None
    files.atomic_write(candidate, text)
    return Refresh(candidate, conflicts, candidate if conflicts else None, owner.name)
