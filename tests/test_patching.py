"""The patch engine against GNU patch and a corpus of bad patches."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hfpatch.patching import PatchError, apply_patch, parse_patch

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 41))


def make_patch(body: str) -> str:
    return textwrap.dedent(body).lstrip("\n")


GOOD = make_patch("""
    --- f.txt
    +++ f.txt
    @@ -2,3 +2,4 @@
     line 2
    -line 3
    +LINE 3
    +inserted
     line 4
    @@ -30,3 +31,3 @@
     line 30
    -line 31
    +LINE 31
     line 32
    """)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "f.txt").write_text(ORIGINAL)
    return tmp_path


def gnu_patch(directory: Path, patch: str, *args: str) -> subprocess.CompletedProcess:
    (directory / "p.diff").write_text(patch)
    return subprocess.run(["patch", "--fuzz=0", "--batch", "-s", *args, "-i", "p.diff"], cwd=directory,
                          capture_output=True, text=True)


def test_apply_matches_gnu_patch_and_reverts_byte_exact(work, tmp_path):
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    shutil.copy(work / "f.txt", gnu / "f.txt")
    assert gnu_patch(gnu, GOOD).returncode == 0
    [result] = apply_patch(GOOD, work)
    assert result.state == "applied"
    assert (work / "f.txt").read_bytes() == (gnu / "f.txt").read_bytes()
    [result] = apply_patch(GOOD, work, reverse=True)
    assert result.state == "reverted"
    assert (work / "f.txt").read_text() == ORIGINAL


def test_offset_is_reported_and_matches_gnu(work, tmp_path):
    shifted = "extra a\nextra b\n" + ORIGINAL
    (work / "f.txt").write_text(shifted)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    (gnu / "f.txt").write_text(shifted)
    assert gnu_patch(gnu, GOOD).returncode == 0
    [result] = apply_patch(GOOD, work)
    assert result.offsets == {1: 2, 2: 2}
    assert "offset +2 lines" in result.describe()
    assert (work / "f.txt").read_bytes() == (gnu / "f.txt").read_bytes()


def test_applying_twice_is_a_noop_with_a_clear_message(work):
    apply_patch(GOOD, work)
    patched = (work / "f.txt").read_bytes()
    [result] = apply_patch(GOOD, work)
    assert result.state == "already-applied" and not result.changed
    assert "already patched" in result.describe()
    assert (work / "f.txt").read_bytes() == patched
    apply_patch(GOOD, work, reverse=True)
    [result] = apply_patch(GOOD, work, reverse=True)
    assert result.state == "not-applied"
    assert (work / "f.txt").read_text() == ORIGINAL


def test_dry_run_writes_nothing(work):
    [result] = apply_patch(GOOD, work, dry_run=True)
    assert result.state == "applied" and result.changed
    assert (work / "f.txt").read_text() == ORIGINAL


def test_no_newline_at_end_of_file_both_directions(tmp_path):
    (tmp_path / "f.txt").write_text("a\nb\nc")  # no final newline
    patch = make_patch("""
        --- f.txt
        +++ f.txt
        @@ -1,3 +1,3 @@
         a
         b
        -c
        \\ No newline at end of file
        +c
        """)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    (gnu / "f.txt").write_text("a\nb\nc")
    assert gnu_patch(gnu, patch).returncode == 0
    apply_patch(patch, tmp_path)
    assert (tmp_path / "f.txt").read_bytes() == (gnu / "f.txt").read_bytes() == b"a\nb\nc\n"
    apply_patch(patch, tmp_path, reverse=True)
    assert (tmp_path / "f.txt").read_bytes() == b"a\nb\nc"


def test_dep3_header_before_the_diff_is_skipped(work, tmp_path):
    patch = "Description: a test\nPin: none\n\n" + GOOD
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    shutil.copy(work / "f.txt", gnu / "f.txt")
    assert gnu_patch(gnu, patch).returncode == 0
    apply_patch(patch, work)
    assert (work / "f.txt").read_bytes() == (gnu / "f.txt").read_bytes()


BAD = {
    "too many lines in hunk": (GOOD.replace(" line 4\n", " line 4\n line 5\n", 1), "malformed hunk"),
    "too few lines in hunk": (GOOD.replace(" line 2\n", "", 1), "malformed hunk"),
    "wrong context": (GOOD.replace(" line 4\n", " line four\n"), "hunk #1 @@ -2,3 +2,4 @@ does not apply"),
    "path traversal": (GOOD.replace("f.txt", "../f.txt"), "outside the target directory"),
    "absolute path": (GOOD.replace("f.txt", "/etc/passwd"), "outside the target directory"),
    "empty patch": ("", "the patch is empty"),
    "no file headers": ("just some text\n", "holds no file diff"),
    "binary": ("diff --git a/f.txt b/f.txt\nindex 1..2 100644\nBinary files a/f.txt and b/f.txt differ\n",
               "binary patches are not supported"),
    "rename": ("diff --git a/f.txt b/g.txt\nsimilarity index 100%\nrename from f.txt\nrename to g.txt\n",
               "rename patches are not supported"),
    "delete": ("--- f.txt\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-line 1\n-line 2\n",
               "create or delete files"),
    "crlf patch": (GOOD.replace("\n", "\r\n"), "CRLF"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_patches_error_clearly_and_leave_the_target_untouched(work, case):
    patch, message = BAD[case]
    with pytest.raises(PatchError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        apply_patch(patch, work)
    assert (work / "f.txt").read_text() == ORIGINAL
    assert sorted(p.name for p in work.iterdir()) == ["f.txt"]


@pytest.mark.parametrize("content, message", [
    (ORIGINAL.replace("\n", "\r\n").encode(), "CRLF line endings"),
    (b"", "the file is empty"),
    (ORIGINAL[:-1].encode(), None),  # missing final newline: hunks near the top still apply
    (ORIGINAL.replace("line 3\n", "line three\n").encode(), "hunk #1"),
])
def test_bad_targets(work, content, message):
    (work / "f.txt").write_bytes(content)
    if message is None:
        apply_patch(GOOD, work)
        assert (work / "f.txt").read_bytes().endswith(b"line 40")
        return
    with pytest.raises(PatchError, match=message):
        apply_patch(GOOD, work)
    assert (work / "f.txt").read_bytes() == content


def test_multi_file_patch_is_all_or_nothing(work):
    (work / "g.txt").write_text("alpha\nbeta\n")
    patch = GOOD + "--- g.txt\n+++ g.txt\n@@ -1,2 +1,2 @@\n alpha\n-gamma\n+GAMMA\n"
    with pytest.raises(PatchError, match="g.txt: hunk #1"):
        apply_patch(patch, work)
    assert (work / "f.txt").read_text() == ORIGINAL


def test_parse_reports_hunks():
    [file_patch] = parse_patch(GOOD)
    assert file_patch.path == "f.txt"
    assert [h.source_start for h in file_patch.hunks] == [2, 30]


KILLER = """
import sys
from pathlib import Path
from hfpatch.patching import apply_patch
patch = Path(sys.argv[1]).read_text()
print("ready", flush=True)
while True:
    apply_patch(patch, target_file=Path(sys.argv[2]))
    apply_patch(patch, target_file=Path(sys.argv[2]), reverse=True)
"""


def test_kill_during_apply_never_leaves_a_half_written_file(tmp_path):
    big = "".join(f"line {i} " + "x" * 200 + "\n" for i in range(1, 20001))
    patch = make_patch("""
        --- f.txt
        +++ f.txt
        @@ -19999,2 +19999,2 @@
        -line 19999 {x}
        +LINE 19999
         line 20000 {x}
        """).replace("{x}", "x" * 200)
    target = tmp_path / "f.txt"
    target.write_text(big)
    apply_patch(patch, target_file=target)
    patched = target.read_bytes()
    apply_patch(patch, target_file=target, reverse=True)
    (tmp_path / "p.diff").write_text(patch)
    for delay in (0.05, 0.11, 0.23, 0.37):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path / "p.diff"), str(target)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert target.read_bytes() in (big.encode(), patched)
