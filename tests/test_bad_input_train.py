"""`hfpatch train` against bad inputs and rude stops: one line, exit status, data intact.

Ctrl-C and SIGTERM (single process and --nproc), launcher deaths, two runs on one --out,
a rerun on new data, an unusable --out, unreadable / ill-fitting checkpoints, a full disk,
a model config transformers rejects, and .json data files.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hfpatch.train.checkpoint import complete_checkpoints
from hfpatch.train.errors import DataError
from hfpatch.train.metrics import read_metrics
from hfpatch.train.rundir import claim_run_dir
from hfpatch.train.sources import read_documents
from test_train_common import (  # noqa: F401
    COMMON, REPO, TINY, cli, cli_ok, error_lines, losses, metrics, train_env, uninterrupted,
)


def checkpoint_names(run_dir: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(Path(run_dir) / "checkpoints")]


def only_error_line(result) -> str:
    """The one ``error:`` line a failed run ends with (setup lines may come before it)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in error_lines(result) if line.startswith("error")]
    assert errors == error_lines(result)[-1:], result.output
    return errors[0]


@pytest.fixture(scope="module")
def interrupted(train_env, tmp_path_factory):
    """The COMMON run stopped by SIGINT right after step 3: (its run dir, the CLI result)."""
    run = tmp_path_factory.mktemp("interrupted")
    patch = pytest.MonkeyPatch()
    patch.setenv("HFPATCH_FAULT", "sigint:step=3")
    try:
        result = cli("llama2", *COMMON, "--out", run)
    finally:
        patch.undo()
    return run, result


@pytest.fixture
def stopped_run(interrupted, tmp_path):
    """A private copy of the interrupted run (checkpoints at steps 2 and 3)."""
    return Path(shutil.copytree(interrupted[0], tmp_path / "run"))


# -- Ctrl-C / SIGTERM ----------------------------------------------------------------------


def test_sigint_saves_at_the_step_boundary_and_the_resume_is_exact(interrupted, stopped_run, uninterrupted):
    run, result = interrupted
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert f"no checkpoint in {run / 'checkpoints'}: starting at step 1" in result.output
    assert error_lines(result)[-1] == (
        f"interrupted by SIGINT; the newest checkpoint is {run / 'checkpoints' / 'step_00000003'}: "
        f"rerun the same command to continue from it (same --out {run}, --resume auto)"
    )
    assert checkpoint_names(run) == ["step_00000002", "step_00000003"]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]

    resumed = cli_ok("llama2", *COMMON, "--out", stopped_run)
    assert f"resumed from {stopped_run / 'checkpoints' / 'step_00000003'} (step 3)" in resumed.output
    assert losses(stopped_run) == uninterrupted


def _start_nproc_run(out: Path, logs: Path) -> subprocess.Popen:
    """``hfpatch train --nproc 2`` as a shell job: its own process group, led by the launcher."""
    return subprocess.Popen(
        [sys.executable, "-m", "hfpatch.train", "llama2", *TINY, "--steps", "1000", "--nproc", "2", "--out", str(out)],
        stdout=open(logs / "stdout", "w"), stderr=open(logs / "stderr", "w"), cwd=REPO, start_new_session=True,
    )


def _wait_for_training(proc: subprocess.Popen, out: Path, logs: Path) -> None:
    deadline = time.monotonic() + 200
    while not read_metrics(out / "metrics.jsonl"):
        assert proc.poll() is None, (logs / "stdout").read_text() + (logs / "stderr").read_text()
        assert time.monotonic() < deadline, "the workers never trained a step"
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if int(ppid) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_workers_die_with_a_kill_9_launcher_and_leave_the_run_dir_free(train_env, tmp_path):
    out = tmp_path / "run"
    proc = _start_nproc_run(out, tmp_path)
    workers = []
    try:
        _wait_for_training(proc, out, tmp_path)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as `kill -9 -PGID` does
        proc.wait()
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [pid for pid in workers if _alive(pid)]
    finally:
        for pid in workers or _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert survivors == []
    # No worker writes on and no stale lock: a rerun takes the run dir at once.
    assert "starting at step 1" in cli_ok("llama2", *TINY, "--steps", "1", "--out", out).output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_nproc_run_stops_on_a_signal_with_a_checkpoint_and_one_line(train_env, tmp_path, signum):
    out = tmp_path / "run"
    proc = _start_nproc_run(out, tmp_path)
    try:
        _wait_for_training(proc, out, tmp_path)
        # The launcher holds the run dir for its workers.
        assert only_error_line(cli("llama2", *TINY, "--steps", "1", "--out", out)) == (
            f"error: --out {out} is in use by another training run (pid {proc.pid}); wait for it to finish or "
            f"stop it, or pass another --out"
        )
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C reaches the terminal's whole foreground job
        else:
            os.kill(proc.pid, signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    stderr = (tmp_path / "stderr").read_text().splitlines()
    newest = out / "checkpoints" / checkpoint_names(out)[-1]
    assert stderr == [
        f"interrupted by {signal.Signals(signum).name}; the newest checkpoint is {newest}: rerun the same command "
        f"to continue from it (same --out {out}, --resume auto)"
    ]
    assert proc.returncode == 128 + signum
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == metrics(out)[-1]["step"]


# -- run directory -------------------------------------------------------------------------


def test_a_second_run_on_a_held_out_dir_is_refused(train_env, tmp_path):
    out = tmp_path / "run"
    with claim_run_dir(out, fresh=False):
        result = cli("llama2", *TINY, "--steps", "1", "--out", out)
    assert only_error_line(result) == (
        f"error: --out {out} is in use by another training run (pid {os.getpid()}); wait for it to finish or "
        f"stop it, or pass another --out"
    )
    assert error_lines(result) == [only_error_line(result)]  # refused before anything was built
    assert not (out / "metrics.jsonl").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("where, nproc, message", [
    ("file", [], "is a file, not a directory"),
    ("file", ["--nproc", "2"], "is a file, not a directory"),
    ("below a file", [], "is not writable (Not a directory)"),
    ("sysfs", [], "is not writable"),
], ids=["file", "file, launcher", "below a file", "sysfs"])
def test_unusable_out_is_one_line_before_anything_is_built(train_env, tmp_path, where, nproc, message):
    out = {
        "file": _write(tmp_path / "out", "x"),
        "below a file": _write(tmp_path / "out", "x") / "run",
        "sysfs": Path("/sys/hfpatch-train-test"),  # no one, root included, may create a dir here
    }[where]
    result = cli("llama2", *TINY, "--steps", "1", *nproc, "--out", out)
    assert result.exit_code == 1
    [line] = error_lines(result)  # before the model and data were built, which print a line each
    assert line.startswith(f"error: --out {out} {message}")


def test_resume_on_new_data_names_the_option_and_resume_never_moves_the_run_aside(train_env, stopped_run, tmp_path):
    data = _write(tmp_path / "new.jsonl", "".join(json.dumps({"text": f"new document {i} " * 5}) + "\n" for i in range(8)))
    refused = only_error_line(cli("llama2", *TINY, "--steps", "1", "--data", data, "--out", stopped_run))
    assert refused == (
        f"error: checkpoint {stopped_run / 'checkpoints' / 'step_00000003'} was trained on different data or seq_len; "
        f"resume with the same --data and --seq-len, or to start a new run instead, pass --resume never "
        f"(moves {stopped_run} aside) or another --out"
    )
    fresh = cli_ok("llama2", *TINY, "--steps", "1", "--data", data, "--out", stopped_run, "--resume", "never")
    [aside] = tmp_path.glob("run.old-*")
    assert f"--resume never: moved the earlier run {stopped_run} to {aside}" in fresh.output
    assert checkpoint_names(aside) == ["step_00000002", "step_00000003"]  # kept whole
    assert [r["step"] for r in metrics(aside)] == [1, 2, 3]
    assert [r["step"] for r in metrics(stopped_run)] == [1]
    assert checkpoint_names(stopped_run) == ["step_00000001"]


# -- checkpoints ---------------------------------------------------------------------------


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(stopped_run, uninterrupted):
    newest = stopped_run / "checkpoints" / "step_00000003"
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # a truncated copy
    result = cli_ok("llama2", *COMMON, "--out", stopped_run)
    warnings = [line for line in error_lines(result) if line.startswith("warning")]
    assert warnings == [
        f"warning: checkpoint {newest} cannot be read: PytorchStreamReader failed reading zip archive: "
        f"failed finding central directory; falling back to {stopped_run / 'checkpoints' / 'step_00000002'}"
    ]
    assert f"resumed from {stopped_run / 'checkpoints' / 'step_00000002'} (step 2)" in result.output
    assert losses(stopped_run) == uninterrupted


def test_checkpoint_of_another_size_or_model_is_one_line_and_kept(stopped_run):
    before = checkpoint_names(stopped_run)
    bigger = only_error_line(cli("llama2", *COMMON, "--set", "model.hidden_size=128", "--out", stopped_run))
    assert bigger.startswith(
        f"error: checkpoint {stopped_run / 'checkpoints' / 'step_00000003'} does not fit this model: "
        f"model.embed_tokens.weight is [1024, 64] there and [1024, 128] here; train with the model settings"
    )
    # Yi with Llama-2's tiny sizes takes the same tensors: only the saved model name tells them apart.
    same_shapes = ["--set", "model.intermediate_size=128", "--set", "model.num_attention_heads=4",
                   "--set", "model.num_key_value_heads=2"]
    other = only_error_line(cli("yi", *COMMON, *same_shapes, "--out", stopped_run))
    assert other.startswith(
        f"error: checkpoint {stopped_run / 'checkpoints' / 'step_00000003'} was saved by a llama2 run, not yi;"
    )
    assert checkpoint_names(stopped_run) == before
    assert [r["step"] for r in metrics(stopped_run)] == [1, 2, 3]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(train_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HFPATCH_FAULT", "enospc:step=2:where=save")
    result = cli("llama2", *TINY, "--steps", "3", "--checkpoint-every", "1", "--out", tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert only_error_line(result) == (
        f"error: cannot save the step 2 checkpoint in {checkpoints}: [Errno 28] No space left on device; "
        f"the newest checkpoint is still {checkpoints / 'step_00000001'}"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001"]  # no temp dir left
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_heads_that_do_not_divide_hidden_size_are_one_line(train_env, tmp_path):
    result = cli("llama2", *TINY, "--set", "model.hidden_size=65", "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: llama2 rejects the model config (model.hidden_size=65): "
        "The hidden size (65) is not a multiple of the number of attention heads (4)."
    ]


# -- data files ----------------------------------------------------------------------------


def test_json_files_are_arrays_or_json_lines_and_errors_say_which(tmp_path):
    records = [{"text": "one"}, {"text": "two"}]
    assert read_documents(_write(tmp_path / "array.json", json.dumps(records, indent=2))) == ["one", "two"]
    assert read_documents(_write(tmp_path / "wrapped.json", json.dumps({"version": 1, "data": records}))) == ["one", "two"]
    assert read_documents(_write(tmp_path / "lines.json", '{"text": "one"}\n{"text": "two"}\n')) == ["one", "two"]
    cases = {
        "broken.json": ('[{"text": "one"},', "broken.json is not valid JSON (Expecting value at line 1 column 18); "
                                             "a .json file is read as one JSON array of records"),
        "two_lists.json": ('{"a": [{"text": "one"}], "b": [{"text": "two"}]}',
                           "two_lists.json holds an object with several lists of records ('a', 'b')"),
        "string.json": ('"one"', "string.json holds a JSON str; a .json data file must be an array of records"),
        "record.json": ('[{"text": "one"}, 5]', "record.json record 2 is not a JSON object"),
        "broken.jsonl": ('{"text": "one"}\n{"text":\n', "broken.jsonl line 2 is not valid JSON (Expecting value); "
                                                       "the file is read as JSON lines, one record per line"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(DataError) as error:
            read_documents(_write(tmp_path / name, text))
        assert message in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["--offload-activations"], "error: --offload-activations offloads the checkpointed layer inputs: it needs "
                                "--activation-checkpointing (or --long-context)"),
    (["--cpu-offload"], "error: --cpu-offload moves parameters off a GPU; this run has none (drop --cpu-offload)"),
    (["--tile-mlp", "-1"], "error: --tile-mlp must be >= 0, got -1"),
])
def test_memory_levers_that_cannot_work_are_one_line(train_env, tmp_path, args, message):
    result = cli("llama2", *TINY, *args, "--out", tmp_path / "run")
    assert result.exit_code == 1 and error_lines(result) == [message]
    assert not (tmp_path / "run").exists()


def test_out_of_gpu_memory_is_one_line_and_keeps_the_checkpoint(train_env, tmp_path, monkeypatch):
    from hfpatch.train import loop

    real_step = loop.train_step

    def step_that_runs_out(*args, **kwargs):
        if kwargs["step"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_that_runs_out)
    result = cli("llama2", *TINY, "--steps", "3", "--checkpoint-every", "1", "--out", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    assert error_lines(result)[-1] == (
        "error: out of GPU memory in step 2 (micro-batches of 1 x 128 tokens); pass --long-context (checkpointing, "
        "activation offload, a tiled MLP) or lower --seq-len / --micro-bsz; the last good checkpoint is "
        f"{checkpoint}")
    assert checkpoint_names(tmp_path) == ["step_00000001"]
