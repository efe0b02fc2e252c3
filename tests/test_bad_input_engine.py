"""Bad input to the patch engine and its CLI: one `error: ...` line, a non-zero exit, data intact.

Grow this module with every engine bug found from bad input (a test that failed before its fix).
"""

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hfpatch import actions, patching, pins, zoo
from hfpatch.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def assert_one_error_line(result, *fragments):
    """Exit 1, no traceback, exactly one line of output and it is `error: ...` naming every fragment."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def zoo_patch(entry) -> Path:
    """The patch of the entry's manifest pin, in its zoo dir (the seed's `patch FILE internevo.patch`)."""
    return entry.directory / "internevo.patch"


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def llama(zoo_copy):
    """llama2's zoo dir with the pinned modeling_llama.py materialized."""
    assert cli("sync", "llama2").exit_code == 0
    return zoo.resolve("llama2")


@pytest.fixture
def pristine(llama) -> bytes:
    return (llama.directory / llama.patch_target).read_bytes()


def fail_io(monkeypatch, path: Path, error: int):
    """Every open() of ``path`` raises ``error``: an unreadable file, even for root (who ignores chmod)."""
    real_open = io.open
    blocked = os.path.realpath(path)

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == blocked:
            raise OSError(error, os.strerror(error), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", guarded)
    monkeypatch.setattr("builtins.open", guarded)


# --------------------------------------------------------------------------- A1: --target symlink


def test_target_symlink_is_refused_like_gnu_patch(llama, pristine, tmp_path):
    """GNU patch 2.7 refuses a symlink target ("is not a regular file -- refusing to patch"); so do we,
    rather than replace the link by a regular file and leave the file it points to unpatched."""
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    (gnu / "real.py").write_bytes(pristine)
    (gnu / "link.py").symlink_to("real.py")
    done = subprocess.run(["patch", "--fuzz=0", "--batch", "link.py", str(zoo_patch(llama))],
                          cwd=gnu, capture_output=True, text=True)
    assert done.returncode != 0 and "not a regular file" in done.stdout + done.stderr

    mine = tmp_path / "mine"
    mine.mkdir()
    real, link = mine / "real.py", mine / "link.py"
    real.write_bytes(pristine)
    link.symlink_to(real)
    for args in (["apply", "llama2", "--target", link], ["apply", "llama2", "--target", link, "--dry-run"],
                 ["revert", "llama2", "--target", link]):
        assert_one_error_line(cli(*args), "symbolic link", str(real.resolve()))
        assert link.is_symlink() and real.read_bytes() == pristine
    assert listing(mine) == ["link.py", "real.py"]


# --------------------------------------------------------------------------- A2: bad patch files

BAD_PATCHES = {
    "not UTF-8": (b"--- modeling_llama.py\n+++ modeling_llama.py\n@@ -1 +1 @@\n-\xff\xfe\n+x\n", "not UTF-8"),
    "empty": (b"", "the patch is empty"),
    "not a diff": (b"this is a README, not a diff\n", "holds no file diff"),
}


@pytest.mark.parametrize("case", BAD_PATCHES)
def test_a_bad_patch_file_shows_the_parsers_message(llama, pristine, case):
    content, message = BAD_PATCHES[case]
    patch = zoo_patch(llama)
    good = patch.read_bytes()
    patch.write_bytes(content)
    assert_one_error_line(cli("apply", "llama2"), str(patch), message)
    assert (llama.directory / llama.patch_target).read_bytes() == pristine
    # status reads the patch to recognise a patched file
    patch.write_bytes(good)
    assert cli("apply", "llama2").exit_code == 0
    patched = (llama.directory / llama.patch_target).read_bytes()
    patch.write_bytes(content)
    assert_one_error_line(cli("status", "llama2"), str(patch), message)
    assert (llama.directory / llama.patch_target).read_bytes() == patched


def test_a_bad_versioned_patch_file_is_one_line(llama):
    legacy = zoo.zoo_root().parent / "patches" / "llama2" / "transformers-4.57.6.patch"
    legacy.write_bytes(b"Pre-Image-SHA256: \xff\n")
    assert_one_error_line(cli("apply", "llama2"), str(legacy), "not UTF-8")


def test_a_second_patch_for_the_manifest_pin_is_one_line(llama):
    """patches/llama2/transformers-5.17.0.patch would shadow internevo.patch; which one applies must not be a guess."""
    second = pins.versioned_patch_path(llama, "5.17.0")
    second.write_bytes(zoo_patch(llama).read_bytes())
    assert_one_error_line(cli("apply", "llama2"), str(second), "second patch for the manifest pin", "remove one")


# --------------------------------------------------------------------------- A3: OS errors


def test_read_only_target_dir_is_one_line(llama, pristine, monkeypatch):
    """Root ignores directory permissions, so the refusal the OS gives a user is simulated."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    before = listing(llama.directory)
    assert_one_error_line(cli("apply", "llama2"), str(llama.directory), "permission denied", "writable")
    assert (llama.directory / llama.patch_target).read_bytes() == pristine
    assert listing(llama.directory) == before


def test_full_disk_during_the_atomic_write_is_one_line_and_leaves_no_temp_file(llama, pristine, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    before = listing(llama.directory)
    assert_one_error_line(cli("apply", "llama2"), str(llama.directory / llama.patch_target), "no space left")
    assert (llama.directory / llama.patch_target).read_bytes() == pristine
    assert listing(llama.directory) == before


def test_unreadable_target_is_one_line(llama, pristine, tmp_path, monkeypatch):
    mine = tmp_path / "modeling_llama.py"
    mine.write_bytes(pristine)
    fail_io(monkeypatch, mine, errno.EACCES)
    assert_one_error_line(cli("apply", "llama2", "--target", mine), str(mine), "permission denied", "readable")
    monkeypatch.undo()
    assert mine.read_bytes() == pristine


def test_unreadable_patch_file_is_one_line(llama, pristine, monkeypatch):
    patch = zoo_patch(llama)
    fail_io(monkeypatch, patch, errno.EACCES)
    assert_one_error_line(cli("apply", "llama2"), str(patch), "permission denied")
    monkeypatch.undo()
    assert (llama.directory / llama.patch_target).read_bytes() == pristine


# --------------------------------------------------------------------------- A4: smaller


def _first_hunk(llama):
    [file_patch] = patching.parse_patch(zoo_patch(llama).read_text())
    return file_patch.hunks[0]


def test_a_drifted_target_shows_the_failing_hunk(llama, pristine, tmp_path):
    hunk = _first_hunk(llama)
    lines = pristine.splitlines(keepends=True)
    lines[hunk.source_start - 1] = b"# a local edit where hunk 1 applies\n"
    mine = tmp_path / "modeling_llama.py"
    mine.write_bytes(b"".join(lines))
    result = cli("apply", "llama2", "--target", mine)
    assert result.exit_code == 1 and "Traceback" not in result.output
    [error] = error_lines(result)
    assert result.output.startswith(error) and "not the pinned upstream" in error
    assert f"hunk #1 {hunk.header} does not apply" in result.output
    assert "# a local edit where hunk 1 applies" in result.output  # what the file has there
    assert mine.read_bytes() == b"".join(lines)


def test_a_crlf_target_says_crlf_and_how_to_convert(llama, pristine, tmp_path):
    mine = tmp_path / "modeling_llama.py"
    mine.write_bytes(pristine.replace(b"\n", b"\r\n"))
    assert_one_error_line(cli("apply", "llama2", "--target", mine), "CRLF line endings", "convert")
    assert mine.read_bytes() == pristine.replace(b"\n", b"\r\n")


def test_an_edited_target_where_the_patch_still_applies_says_so(llama, pristine, tmp_path):
    mine = tmp_path / "modeling_llama.py"
    mine.write_bytes(pristine + b"# my edit\n")
    assert_one_error_line(cli("apply", "llama2", "--target", mine), "other edits")


def test_check_failures_name_the_model_and_the_pin(llama):
    """llama2, yi and internlm1 share one patch: a broken hunk fails all three, each named with its pin."""
    patch = zoo_patch(llama)
    hunk = _first_hunk(llama)
    text = patch.read_text()
    body = text[text.index("\n--- "):]
    context = next(line for line in body.split("\n") if line.startswith(" ") and line[1:].strip())
    patch.write_text(text.replace(f"\n{context}\n", f"\n{context} # drifted\n", 1))
    result = cli("check")
    assert result.exit_code == 1 and "Traceback" not in result.output
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    for model in ("llama2", "yi", "internlm1"):
        assert any(line.startswith(f"FAIL  {model} @ transformers==5.17.0: ") for line in failures), result.output
    assert all(line.split()[1] in ("llama2", "yi", "internlm1") for line in failures), result.output
    assert f"hunk #{hunk.number}" in result.output
    assert "ok    yi @ transformers==4.57.6" in result.output  # the legacy pin's own patch is fine


def test_check_names_a_header_without_dep3_fields(llama):
    patch = zoo_patch(llama)
    text = patch.read_text()
    origin = next(line for line in text.split("\n") if line.startswith("Origin:"))
    patch.write_text(text.replace(origin, "Origin: somewhere"))
    result = cli("check", "yi")
    assert result.exit_code == 1
    assert "FAIL  yi @ transformers==5.17.0: " in result.output and "Origin" in result.output


def test_revert_says_when_the_result_is_not_the_pin(llama, pristine):
    path = llama.directory / llama.patch_target
    assert cli("apply", "llama2").exit_code == 0
    path.write_bytes(path.read_bytes() + b"# my edit\n")
    result = cli("revert", "llama2")
    assert result.exit_code == 0, result.output
    assert "reverted, but the result does not match the pinned sha256" in result.output
    assert "other edits" in result.output
    assert path.read_bytes() == pristine + b"# my edit\n"
    path.write_bytes(pristine)
    assert cli("apply", "llama2").exit_code == 0
    assert "does not match" not in cli("revert", "llama2").output


def test_dry_run_says_would_patch(llama, pristine):
    result = cli("apply", "llama2", "--dry-run")
    assert result.exit_code == 0
    assert "modeling_llama.py: would patch" in result.output and ": patched" not in result.output
    assert (llama.directory / llama.patch_target).read_bytes() == pristine


KILLED_WRITE = """
import os, signal, sys, time
from hfpatch import actions, zoo
if sys.argv[1] == "killed":   # die between writing the temp file and renaming it over the target
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
else:                          # a write still in progress: hold the temp file until killed
    def hang(*a):
        print("writing", flush=True)
        time.sleep(600)
    os.replace = hang
actions.apply(zoo.resolve("llama2"))
"""


def _ours(directory: Path, target: str) -> list[str]:
    return [name for name in listing(directory) if name.startswith(f".{target}.")]


def test_temp_files_of_killed_writes_are_cleaned_by_the_next_write_or_status(llama, pristine):
    directory, target = llama.directory, llama.patch_target
    env = {**os.environ, "HFPATCH_ZOO": str(zoo.zoo_root())}
    subprocess.run([sys.executable, "-c", KILLED_WRITE, "killed"], env=env, check=False)
    [stale] = _ours(directory, target)
    foreign = directory / f".{target}.tmp"  # not of our naming: never touched
    foreign.write_text("someone else's")
    assert cli("status", "llama2").exit_code == 0
    assert _ours(directory, target) == [foreign.name] and (directory / target).read_bytes() == pristine

    subprocess.run([sys.executable, "-c", KILLED_WRITE, "killed"], env=env, check=False)
    assert len(_ours(directory, target)) == 2
    assert cli("apply", "llama2").exit_code == 0
    assert _ours(directory, target) == [foreign.name]

    assert cli("revert", "llama2").exit_code == 0
    live = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, "live"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "writing"
        [in_progress] = [n for n in _ours(directory, target) if n != foreign.name]
        assert cli("status", "llama2").exit_code == 0
        assert in_progress in _ours(directory, target)  # locked by a live writer: kept
    finally:
        live.kill()
        live.wait()
    assert cli("status", "llama2").exit_code == 0
    assert _ours(directory, target) == [foreign.name]


def test_refresh_to_the_manifest_pin_is_refused(zoo_copy):
    """Its patch is internevo.patch; a candidate beside the other pins would never be read."""
    assert_one_error_line(cli("refresh", "yi", "--to", "5.17.0"), "manifest pin", "internevo.patch")
    assert listing(zoo_copy.parent / "patches" / "llama2") == ["transformers-4.57.6.patch"]


def test_a_broken_cached_wheel_is_one_line(zoo_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "cache" / "wheels" / "transformers-5.99.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"<html>a proxy's error page, not a zip</html>")
    assert_one_error_line(cli("refresh", "llama2", "--to", "5.99.0"), str(wheel), "not a valid wheel", "delete it")
    assert not pins.candidate_path(zoo.resolve("llama2"), "5.99.0").exists()


# --------------------------------------------------------------------------- one error base class


def test_every_user_error_derives_from_one_base():
    from hfpatch import drift, engines, errors, upstream
    from hfpatch.train import errors as train_errors

    for cls in (zoo.ZooError, actions.ActionError, patching.PatchError, upstream.UpstreamError, engines.EngineError,
                drift.DriftError, train_errors.TrainError):
        assert issubclass(cls, errors.UserError), cls
