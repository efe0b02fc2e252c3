"""Recovery: kill -9 mid-save then resume, torchrun restarts, NaN stop."""

import signal

import pytest

from hfpatch.train.checkpoint import complete_checkpoints
from test_train_common import (  # noqa: F401
    COMMON, cli, cli_ok, error_lines, losses, metrics, module, torchrun, train_env, uninterrupted,
)


def test_kill_9_during_a_save_then_resume_gives_the_uninterrupted_losses(uninterrupted, tmp_path):
    killed = module("llama2", *COMMON, "--out", tmp_path, env={"HFPATCH_FAULT": "kill:step=4:where=save"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "checkpoints"
    # The half-written step 4 is a temp dir; step 2 is still the newest usable checkpoint.
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000002"]
    assert (ckpts / ".tmp-step_00000004").is_dir()
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]

    resumed = cli_ok("llama2", *COMMON, "--out", tmp_path)
    assert f"resumed from {ckpts / 'step_00000002'}" in resumed.output
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path) == pytest.approx(uninterrupted, rel=1e-6)
    # keep_checkpoints=2 and no temp dirs left behind
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006"]


def test_torchrun_restart_recovers_a_dead_worker_from_the_last_checkpoint(uninterrupted, tmp_path):
    # Rank 1 dies at step 3 on the first attempt only; torchrun restarts both workers.
    proc = torchrun("llama2", *COMMON, "--sp", "2", "--out", tmp_path, max_restarts=1,
                    env={"HFPATCH_FAULT": "exit:rank=1:step=3:attempt=0"})
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000002'}" in proc.stdout
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path) == pytest.approx(uninterrupted, rel=1e-5)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(train_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HFPATCH_FAULT", "nan:step=3")
    result = cli("llama2", *COMMON, "--out", tmp_path)
    assert result.exit_code == 1
    last = error_lines(result)[-1]
    assert last == (
        f"error: loss is nan at step 3; stopped before updating the weights, "
        f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step_00000002'}"
    )
    assert "Traceback" not in result.output
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    # The kept checkpoint is usable: without the fault the run resumes from it and finishes.
    monkeypatch.delenv("HFPATCH_FAULT")
    assert "resumed from" in cli_ok("llama2", *COMMON, "--out", tmp_path).output
