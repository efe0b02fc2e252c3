"""What the CLI commands do: sync, check, apply, revert, status, diff for zoo entries."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from hfpatch import engines, files, patching, pins, upstream, zoo
from hfpatch.errors import UserError
from hfpatch.pins import Pin
from hfpatch.zoo import Entry

PORT_DIR = "port"  # committed pristine source of a first-party port; synced beside it like upstream files


class ActionError(UserError):
    """A user-facing failure of a zoo action."""


def patch_text(entry: Entry, engine: str = engines.DEFAULT_ENGINE, entries: list[Entry] | None = None,
               pin: Pin | None = None) -> str:
    """The patch of ``pin`` (default: the active one) rendered for ``engine``."""
    path = (pin or pins.active_pin(entry, entries)).patch
    if path is None:
        raise ActionError(f"{entry.name}: no patch yet ({entry.notes or 'planned'})")
    if not path.is_file():
        raise ActionError(f"{entry.name}: patch file {path} is missing")
    return engines.render(pins.read_patch(path), engine)


# --------------------------------------------------------------------------- sync


def pinned_bytes(entry: Entry, file_name: str, pin: Pin | None = None) -> bytes:
    """The materialized upstream file at ``pin`` (default: the manifest pin), sha256-verified."""
    up = entry.upstream
    pin = pin or pins.manifest_pin(entry)
    if up.kind == "port":
        path = entry.directory / PORT_DIR / file_name
        if not path.is_file():
            raise ActionError(f"{entry.name}: first-party port file {path} is missing")
        data = files.read_bytes(path)
    else:
        try:
            data = upstream.materialize(up.package, pin.version, f"{up.path}/{file_name}")
        except upstream.UpstreamError as exc:
            raise ActionError(f"{entry.name}: {exc}") from None
    expected = pin.hashes.get(file_name)
    actual = upstream.sha256_bytes(data)
    if expected != actual:
        raise ActionError(
            f"{entry.name}: {file_name} from {up.package}=={pin.version} does not match the manifest: "
            f"manifest sha256 {expected or '(none)'}, materialized sha256 {actual}"
        )
    return data


@dataclass
class FileState:
    file_name: str
    state: str  # missing | pristine | patched | patched (internevo) | modified
    sha256: str | None


def classify(entry: Entry, file_name: str, data: bytes, entries: list[Entry] | None = None,
             pin: Pin | None = None) -> str:
    """pristine | patched | patched (<engine>) | modified: what these bytes are relative to the pin."""
    pin = pin or pins.active_pin(entry, entries)
    if upstream.sha256_bytes(data) == pin.hashes.get(file_name):
        return "pristine"
    if entry.has_patch and file_name == entry.patch_target:
        for engine in engines.ENGINE_IMPORTS:
            [file_patch] = patching.parse_patch(patch_text(entry, engine, entries, pin))
            try:
                state = patching.plan_file(file_name, data, file_patch).state
            except patching.PatchError:
                continue
            if state == "already-applied":
                return "patched" if engine == engines.DEFAULT_ENGINE else f"patched ({engine})"
    return "modified"


def file_state(entry: Entry, file_name: str, entries: list[Entry] | None = None) -> FileState:
    path = entry.directory / file_name
    if not path.is_file():
        return FileState(file_name, "missing", None)
    data = files.read_bytes(path)
    return FileState(file_name, classify(entry, file_name, data, entries), upstream.sha256_bytes(data))


def status(entry: Entry, entries: list[Entry] | None = None) -> list[FileState]:
    """The state of each of the entry's files; first removes what killed writes left in its dir."""
    files.remove_stale_temps(entry.directory)
    return [file_state(entry, file_name, entries) for file_name in entry.upstream.files]


def sync(entry: Entry, force: bool = False, entries: list[Entry] | None = None) -> list[str]:
    """Write the pinned upstream files into the zoo dir; keep patched files, refuse local edits."""
    pin = pins.active_pin(entry, entries)
    planned = {}
    messages = []
    for file_name in pin.hashes:
        state = file_state(entry, file_name, entries)
        if state.state == "pristine" or (state.state.startswith("patched") and not force):
            messages.append(f"{entry.name}: {file_name} up to date ({state.state})")
            continue
        if state.state == "modified" and not force:
            raise ActionError(
                f"{entry.name}: {entry.directory / file_name} has local changes that are not the patch "
                f"(sha256 {state.sha256}); rerun with --force to overwrite it"
            )
        planned[file_name] = pinned_bytes(entry, file_name, pin)
    for file_name, data in planned.items():  # only after every file verified
        files.atomic_write(entry.directory / file_name, data)
        messages.append(f"{entry.name}: {file_name} materialized from {pins.pin_label(entry, pin)} (sha256 ok)")
    return messages


# --------------------------------------------------------------------------- check / apply / revert


@dataclass
class CheckLine:
    ok: bool
    text: str  # starts with "<model> @ <pin>: "


def check(entry: Entry, entries: list[Entry] | None = None) -> list[CheckLine]:
    """Dry-run every pin's patch (every engine) against freshly materialized bytes.

    Each line names the model and the pin: llama2, yi and internlm1 share one patch.
    """
    if not entry.has_patch:
        raise ActionError(f"{entry.name}: no patch to check")
    try:
        available = pins.supported(entry, entries)
    except UserError as exc:
        return [CheckLine(False, f"{entry.name}: {exc}")]
    lines = []
    for pin in available.values():
        label = f"{entry.name} @ {pins.pin_label(entry, pin)}"
        try:
            lines += [CheckLine(True, f"{label}: {text}") for text in _check_pin(entry, pin, entries)]
        except UserError as exc:  # pinned_bytes names the model itself; the label already does
            lines.append(CheckLine(False, f"{label}: {str(exc).removeprefix(f'{entry.name}: ')}"))
    return lines


def _check_pin(entry: Entry, pin: Pin, entries: list[Entry] | None) -> list[str]:
    target = entry.patch_target
    header = pins.read_header(pins.read_patch(pin.patch))
    problems = pins.header_problems(header)
    if problems:
        raise ActionError(f"{pin.patch}: DEP-3 header: {'; '.join(problems)}")
    pristine = pinned_bytes(entry, target, pin)
    if header.get("pre-image-sha256") and header["pre-image-sha256"] != upstream.sha256_bytes(pristine):
        raise ActionError(f"the patch was made for a {target} with sha256 {header['pre-image-sha256']}, "
                          f"the pin materializes {upstream.sha256_bytes(pristine)}")
    lines = []
    for engine in engines.ENGINE_IMPORTS:
        [file_patch] = patching.parse_patch(patch_text(entry, engine, entries, pin))
        result = patching.plan_file(target, pristine, file_patch)
        if result.state != "applied":
            raise ActionError(f"patch ({engine}) does not apply to the pinned {target}: {result.state}")
        if engine == engines.DEFAULT_ENGINE and header.get("post-image-sha256"):
            if upstream.sha256_bytes(result.new_bytes) != header["post-image-sha256"]:
                raise ActionError(f"applying gives a {target} whose sha256 differs from the patch's Post-Image-SHA256")
        try:
            compile(result.new_bytes, f"{entry.name}/{target} ({engine})", "exec")
        except SyntaxError as exc:
            raise ActionError(f"patched {target} ({engine}) does not compile: {exc}") from None
        offsets = f", offsets {result.offsets}" if result.offsets else ""
        lines.append(f"{target} patch ({engine}) applies cleanly{offsets}")
    return lines


def _why_not_pristine(entry: Entry, data: bytes, engine: str, entries: list[Entry] | None, pin: Pin) -> str:
    """The failing hunk, the CRLF line endings, or the other edits that make ``data`` not the pin."""
    [file_patch] = patching.parse_patch(patch_text(entry, engine, entries, pin))
    try:
        patching.plan_file(entry.patch_target, data, file_patch)
    except patching.PatchError as exc:
        return str(exc).removeprefix(f"{entry.patch_target}: ")
    return "the patch would apply, but the file has other edits; start from an unedited copy of the pinned file"


def _target_path(entry: Entry, target: Path | None, engine: str, entries: list[Entry] | None) -> Path:
    """The file to patch, checked to be the pin (or already patched with ``engine``)."""
    if target is None:
        if file_state(entry, entry.patch_target, entries).state == "missing":
            sync(entry, entries=entries)
        target = entry.directory / entry.patch_target
    target = Path(target)
    files.refuse_symlink(target)
    if not target.is_file():
        raise ActionError(f"{target}: no such file")
    pin = pins.active_pin(entry, entries)
    data = files.read_bytes(target)
    state = classify(entry, entry.patch_target, data, entries, pin)
    wanted = "patched" if engine == engines.DEFAULT_ENGINE else f"patched ({engine})"
    if state.startswith("patched") and state != wanted:
        raise ActionError(f"{target} is already {state}; run `hfpatch revert {entry.name}` before applying engine {engine}")
    if state == "modified":
        raise ActionError(
            f"{target} is not the pinned upstream {entry.patch_target} of {pins.pin_label(entry, pin)} "
            f"(sha256 {upstream.sha256_bytes(data)}, expected {pin.hashes.get(entry.patch_target)}): "
            + _why_not_pristine(entry, data, engine, entries, pin)
        )
    return target


def apply(entry: Entry, target: Path | None = None, engine: str = engines.DEFAULT_ENGINE,
          dry_run: bool = False, entries: list[Entry] | None = None) -> list[patching.FileResult]:
    if not entry.has_patch:
        raise ActionError(f"{entry.name}: no patch yet ({entry.notes or 'planned'})")
    path = _target_path(entry, target, engine, entries)
    return patching.apply_patch(patch_text(entry, engine, entries), target_file=path, dry_run=dry_run)


def revert(entry: Entry, target: Path | None = None, entries: list[Entry] | None = None) -> list[patching.FileResult]:
    """Revert whichever engine flavour is applied; byte-exact back to the pin unless the file had other edits."""
    if not entry.has_patch:
        raise ActionError(f"{entry.name}: no patch to revert")
    path = Path(target) if target else entry.directory / entry.patch_target
    if not path.is_file():
        raise ActionError(f"{path}: no such file (run `hfpatch sync {entry.name}` first)")
    pin = pins.active_pin(entry, entries)
    outcomes = []
    for engine in engines.ENGINE_IMPORTS:
        text = patch_text(entry, engine, entries, pin)
        try:
            planned = patching.apply_patch(text, target_file=path, reverse=True, dry_run=True)
        except patching.PatchError as exc:
            outcomes.append(exc)
            continue
        if planned[0].state == "reverted":
            results = patching.apply_patch(text, target_file=path, reverse=True)
            if upstream.sha256_bytes(results[0].new_bytes) != pin.hashes.get(entry.patch_target):
                results[0].note = (f"but the result does not match the pinned sha256 ({pins.pin_label(entry, pin)}): "
                                   "the file had other edits")
            return results
        outcomes.append(planned)
    for outcome in outcomes:
        if not isinstance(outcome, Exception):
            return outcome  # not applied: nothing to revert
    raise ActionError(str(outcomes[0]))


def diff(entry: Entry, entries: list[Entry] | None = None) -> str:
    """Unified diff from the pinned upstream file to the one in the zoo dir."""
    if entry.patch_target is None:
        raise ActionError(f"{entry.name}: no patch target")
    path = entry.directory / entry.patch_target
    if not path.is_file():
        raise ActionError(f"{path}: not materialized (run `hfpatch sync {entry.name}`)")
    pristine = pinned_bytes(entry, entry.patch_target, pins.active_pin(entry, entries)).decode().splitlines(keepends=True)
    current = files.read_bytes(path).decode(errors="replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(pristine, current, f"{entry.patch_target} (pin)", entry.patch_target))


def record_hashes(entry: Entry) -> list[str]:
    """Maintainer helper: write the materialized files' sha256 into the manifest."""
    manifest = entry.directory / zoo.MANIFEST
    text = manifest.read_text()
    messages = []
    for file_name in entry.upstream.files:
        up = entry.upstream
        data = upstream.materialize(up.package, up.version, f"{up.path}/{file_name}") if up.kind == "package" \
            else (entry.directory / PORT_DIR / file_name).read_bytes()
        digest = upstream.sha256_bytes(data)
        text, count = re.subn(rf'^("{re.escape(file_name)}"\s*=\s*)"[0-9a-f]*"', rf'\g<1>"{digest}"', text, flags=re.M)
        if count != 1:
            raise ActionError(f"{manifest}: cannot find the line for {file_name} under [upstream.files]")
        messages.append(f"{entry.name}: {file_name} sha256 {digest}")
    files.atomic_write(manifest, text.encode())
    return messages


def support_matrix(entries: list[Entry]) -> list[dict]:
    """One row per entry: what `hfpatch list` prints."""
    rows = []
    for entry in entries:
        up = entry.upstream
        rows.append({
            "model": entry.name,
            "seed": entry.seed_name,
            "path": entry.relative_dir,
            "upstream": f"{up.package}=={up.version}" if up.kind == "package" else "first-party port",
            "patch": ("ready" + (f" (reuses {entry.patch_from})" if entry.patch_from else "")) if entry.has_patch
            else "none yet",
            "varlen": entry.capabilities.get("varlen", False),
            "isp": entry.capabilities.get("isp", False),
            "weight_parallel": entry.capabilities.get("weight_parallel", False),
            "notes": entry.notes,
        })
    return rows
