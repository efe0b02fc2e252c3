"""Exact unified-diff application: parse (unidiff), apply, reverse, dry-run.

Semantics follow GNU ``patch`` with ``--fuzz 0``: every context and removed line
must match byte for byte; a hunk may be found at an offset from its header line
(reported); a patch whose reverse applies cleanly is "already applied" and is not
an error. Writes are atomic (temp file + rename) and every file of a patch is
checked before any file is written, so a failure leaves all targets untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import unidiff

from hfpatch import files
from hfpatch.errors import UserError

HUNK_HEADER = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
NO_NEWLINE_MARKER = "\\"


class PatchError(UserError):
    """A patch that cannot be parsed or applied; the message is meant for users."""


@dataclass
class Hunk:
    number: int  # 1-based, as GNU patch counts
    source_start: int
    target_start: int
    old_lines: list[bytes]  # context + removed, each with its own line ending
    new_lines: list[bytes]  # context + added
    header: str

    def reversed(self) -> "Hunk":
        return Hunk(self.number, self.target_start, self.source_start, self.new_lines, self.old_lines, self.header)


@dataclass
class FilePatch:
    path: str  # relative to the directory the patch is applied in
    hunks: list[Hunk]


@dataclass
class FileResult:
    path: str
    state: str  # "applied" | "already-applied" | "reverted" | "not-applied"
    offsets: dict[int, int] = field(default_factory=dict)  # hunk number -> offset in lines
    new_bytes: bytes | None = None  # content to write, None when nothing changes
    dry_run: bool = False  # planned only: nothing was written
    note: str = ""  # said after the state, e.g. that a reverted file is still not the pin

    @property
    def changed(self) -> bool:
        return self.new_bytes is not None

    def describe(self) -> str:
        words = {
            "applied": "would patch" if self.dry_run else "patched",
            "reverted": "would revert" if self.dry_run else "reverted",
            "already-applied": "already patched (the patch is applied; nothing to do)",
            "not-applied": "not patched (nothing to revert)",
        }[self.state]
        text = f"{self.path}: {words}" + (f", {self.note}" if self.note else "")
        applied = "would apply" if self.dry_run else "applied"
        for number, offset in sorted(self.offsets.items()):
            text += f"\n  hunk #{number} {applied} at offset {offset:+d} lines"
        return text


# --------------------------------------------------------------------------- parsing


def _check_hunk_counts(raw: bytes) -> None:
    """Verify every hunk body has exactly the line counts its header declares.

    unidiff catches a hunk that is too short but silently drops the surplus lines
    of one that is too long: the classic hand-edit mistake, so we count ourselves.
    """
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    i = 0
    while i < len(lines):
        match = HUNK_HEADER.match(lines[i])
        if not match:
            i += 1
            continue
        header_line = i + 1
        old_count = int(match.group(2) or b"1")
        new_count = int(match.group(4) or b"1")
        old_seen = new_seen = 0
        i += 1
        while i < len(lines) and (old_seen < old_count or new_seen < new_count):
            line = lines[i]
            tag = line[:1]
            if tag == b" " or line == b"":
                old_seen, new_seen = old_seen + 1, new_seen + 1
            elif tag == b"-":
                old_seen += 1
            elif tag == b"+":
                new_seen += 1
            elif tag != b"\\":
                break
            i += 1
        while i < len(lines) and lines[i][:1] == b"\\":
            i += 1
        surplus = i < len(lines) and lines[i][:1] in (b" ", b"-", b"+") and not _is_file_header(lines, i)
        if old_seen != old_count or new_seen != new_count or surplus:
            if surplus:
                while i < len(lines) and lines[i][:1] in (b" ", b"-", b"+") and not _is_file_header(lines, i):
                    tag = lines[i][:1]
                    old_seen += tag in (b" ", b"-")
                    new_seen += tag in (b" ", b"+")
                    i += 1
            raise PatchError(
                f"malformed hunk at patch line {header_line} ({lines[header_line - 1].decode(errors='replace')}): "
                f"header declares {old_count} old / {new_count} new lines, body has {old_seen} old / {new_seen} new"
            )


def _is_file_header(lines: list[bytes], i: int) -> bool:
    if lines[i] == b"-- ":  # git format-patch signature separator
        return True
    return lines[i].startswith(b"--- ") and i + 1 < len(lines) and lines[i + 1].startswith(b"+++ ")


def _relative_path(patched_file: unidiff.PatchedFile) -> str:
    source = patched_file.source_file.split("\t")[0]
    target = patched_file.target_file.split("\t")[0]
    name = target if target != "/dev/null" else source
    # git-style a/ b/ prefixes, stripped only when both sides carry them
    if source.startswith("a/") and target.startswith("b/"):
        name = name[2:]
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise PatchError(f"patch touches {name!r}, a path outside the target directory; refusing")
    return str(path)


def _to_bytes_lines(hunk: unidiff.Hunk, wanted: str) -> list[bytes]:
    """The hunk's old ('-') or new ('+') side, honouring '\\ No newline at end of file'."""
    out: list[bytes] = []
    last_kept = False
    for line in hunk:
        if line.line_type == NO_NEWLINE_MARKER:
            if last_kept and out and out[-1].endswith(b"\n"):
                out[-1] = out[-1][:-1]
            continue
        last_kept = line.line_type == " " or line.line_type == wanted
        if last_kept:
            value = line.value.encode("utf-8")
            out.append(value if value.endswith(b"\n") else value + b"\n")
    return out


def parse_patch(text: str | bytes) -> list[FilePatch]:
    """Parse a unified diff into per-file hunks; reject what we will not apply."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if not raw.strip():
        raise PatchError("the patch is empty")
    if b"\r\n" in raw:
        raise PatchError("the patch has CRLF line endings; patches must use LF")
    _check_hunk_counts(raw)
    try:
        patch_set = unidiff.PatchSet(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PatchError(f"the patch is not UTF-8 text: {exc}") from None
    except unidiff.UnidiffParseError as exc:
        raise PatchError(f"malformed patch: {exc}") from None
    if len(patch_set) == 0:
        raise PatchError("the patch holds no file diff (no '--- ' / '+++ ' headers with hunks)")
    files = []
    for patched_file in patch_set:
        path = _relative_path(patched_file)
        if patched_file.is_binary_file:
            raise PatchError(f"{path}: binary patches are not supported")
        if patched_file.is_rename:
            raise PatchError(f"{path}: rename patches are not supported")
        if patched_file.is_removed_file or patched_file.is_added_file:
            raise PatchError(f"{path}: patches that create or delete files are not supported")
        if len(patched_file) == 0:
            raise PatchError(f"{path}: the file diff has no hunks")
        hunks = [
            Hunk(
                number=n,
                source_start=h.source_start,
                target_start=h.target_start,
                old_lines=_to_bytes_lines(h, "-"),
                new_lines=_to_bytes_lines(h, "+"),
                header=f"@@ -{h.source_start},{h.source_length} +{h.target_start},{h.target_length} @@",
            )
            for n, h in enumerate(patched_file, start=1)
        ]
        files.append(FilePatch(path, hunks))
    return files


# --------------------------------------------------------------------------- applying


def _find(lines: list[bytes], needle: list[bytes], expected: int, lowest: int) -> int | None:
    """Exact match nearest to ``expected`` (GNU patch's search order), not before ``lowest``."""
    limit = len(lines) - len(needle)
    for distance in range(0, max(limit, 0) + abs(expected) + 2):
        for candidate in (expected - distance, expected + distance) if distance else (expected,):
            if lowest <= candidate <= limit and lines[candidate : candidate + len(needle)] == needle:
                return candidate
        if expected - distance < lowest and expected + distance > limit:
            break
    return None


class HunkFailed(PatchError):
    def __init__(self, path: str, hunk: Hunk, lines: list[bytes]):
        self.hunk = hunk
        start = max(hunk.source_start - 1, 0)
        found = b"".join(lines[start : start + len(hunk.old_lines)]).decode(errors="replace")
        wanted = b"".join(hunk.old_lines).decode(errors="replace")
        super().__init__(
            f"{path}: hunk #{hunk.number} {hunk.header} does not apply (exact match, fuzz 0)\n"
            f"--- expected at line {hunk.source_start}:\n{wanted}"
            f"--- the file has there:\n{found}"
        )


def _apply_hunks(path: str, original: bytes, hunks: list[Hunk]) -> tuple[bytes, dict[int, int]]:
    lines = original.splitlines(keepends=True)
    out: list[bytes] = []
    offsets: dict[int, int] = {}
    cursor = 0  # first line of `lines` not yet copied to out
    last_offset = 0
    for hunk in hunks:
        # a hunk with no old lines inserts *after* its start line
        header_index = hunk.source_start if not hunk.old_lines else hunk.source_start - 1
        position = _find(lines, hunk.old_lines, header_index + last_offset, cursor)
        if position is None:
            raise HunkFailed(path, hunk, lines)
        if position != header_index:
            offsets[hunk.number] = position - header_index
        last_offset = position - header_index
        out.extend(lines[cursor:position])
        out.extend(hunk.new_lines)
        cursor = position + len(hunk.old_lines)
    out.extend(lines[cursor:])
    return b"".join(out), offsets


def plan_file(path: str, original: bytes, file_patch: FilePatch, reverse: bool = False) -> FileResult:
    """Decide what applying (or reverting) ``file_patch`` to ``original`` does, without writing."""
    if b"\r\n" in original:
        raise PatchError(f"{path}: the file has CRLF line endings and the patch LF; convert the file to LF first "
                         f"(dos2unix, or sed -i 's/\\r$//' FILE)")
    if not original:
        raise PatchError(f"{path}: the file is empty; it is not the file this patch was made for")
    forward = [h.reversed() for h in file_patch.hunks] if reverse else file_patch.hunks
    backward = file_patch.hunks if reverse else [h.reversed() for h in file_patch.hunks]
    try:
        new_bytes, offsets = _apply_hunks(path, original, forward)
        return FileResult(path, "reverted" if reverse else "applied", offsets, new_bytes)
    except HunkFailed as failure:
        try:
            _apply_hunks(path, original, backward)
        except HunkFailed:
            if reverse:
                raise PatchError(f"{path}: cannot revert, the file matches neither side of the patch\n{failure}") from None
            raise failure from None
        return FileResult(path, "not-applied" if reverse else "already-applied")


def _inside(directory: Path, relative: str) -> Path:
    """``directory / relative``, refused when it resolves outside ``directory``."""
    if directory.resolve() not in (directory / relative).resolve().parents:
        raise PatchError(f"patch touches {relative!r}, which resolves outside {directory.resolve()}; refusing")
    return directory / relative


def apply_patch(
    patch_text: str | bytes,
    directory: Path | None = None,
    *,
    target_file: Path | None = None,
    reverse: bool = False,
    dry_run: bool = False,
) -> list[FileResult]:
    """Apply (or revert) a patch in ``directory``, or to one explicit ``target_file``.

    ``target_file`` mirrors ``patch FILE PATCH``: a single-file patch applied to the
    given file whatever name its headers carry. Every file is planned first; nothing
    is written unless all of them succeed.
    """
    file_patches = parse_patch(patch_text)
    if target_file is not None:
        if len(file_patches) != 1:
            raise PatchError(f"the patch touches {len(file_patches)} files; an explicit target takes a single-file patch")
        targets = [Path(target_file)]
    else:
        if directory is None:
            raise ValueError("apply_patch needs a directory or a target_file")
        targets = [_inside(Path(directory), fp.path) for fp in file_patches]
    results = []
    for target, file_patch in zip(targets, file_patches):
        files.refuse_symlink(target)
        if not target.is_file():
            raise PatchError(f"{target}: no such file to patch")
        result = plan_file(str(target), files.read_bytes(target), file_patch, reverse=reverse)
        result.dry_run = dry_run
        results.append(result)
    if not dry_run:
        for target, result in zip(targets, results):
            if result.changed:
                files.atomic_write(target, result.new_bytes)
    return results
