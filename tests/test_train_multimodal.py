"""`hfpatch train llava` / `hfpatch train flux` on their embedded synthetic data: finite losses, and
ISP sp=2 (alone and with FSDP2 weight parallel wp=2) reproduces the one-process loss curve."""

import math
import shutil

import pytest

from test_train_common import cli_ok, losses, metrics, torchrun, train_env  # noqa: F401

SMALL = ["--seq-len", "64", "--micro-num", "2"]


@pytest.mark.parametrize("model", ["llava", "flux"])
def test_train_runs_and_records_finite_losses(train_env, tmp_path, model):
    result = cli_ok(model, *SMALL, "--steps", "2", "--out", tmp_path / "run")
    assert "embedded synthetic" in result.output
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve)
    assert all(r["tokens"] > 0 for r in metrics(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.parametrize("model", ["llava", "flux"])
def test_isp_and_weight_parallel_curves_equal_one_process(train_env, tmp_path, model):
    common = [*SMALL, "--steps", "2", "--dtype", "float64", "--seed", "5"]
    cli_ok(model, *common, "--out", tmp_path / "sp1")
    want = metrics(tmp_path / "sp1")
    assert want[0]["loss"] != want[1]["loss"]  # really training
    for name, layout in (("sp2", ["--sp", "2"]), ("sp2_wp2", ["--sp", "2", "--wp", "2"])):
        torchrun(model, *common, *layout, "--out", tmp_path / name)
        got = metrics(tmp_path / name)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6), name
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-9), name
        assert [r["tokens"] for r in got] == [r["tokens"] for r in want], name


@pytest.mark.parametrize("model", ["llava", "flux"])
def test_resume_is_exact(train_env, tmp_path, model):
    # Flux draws its noise from the seed and the data position, so a resumed step sees the same noise.
    common = [*SMALL, "--steps", "3", "--dtype", "float64", "--checkpoint-every", "2", "--out", tmp_path]
    cli_ok(model, *common)
    full = metrics(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000003")
    assert "resumed from" in cli_ok(model, *common).output
    resumed = metrics(tmp_path)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [(r["loss"], r["grad_norm"], r["tokens"]) for r in resumed] == [(r["loss"], r["grad_norm"], r["tokens"]) for r in full]
