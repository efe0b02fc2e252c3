"""`hfpatch train ROW` runs for every trainable zoo row, and ISP sp=2 equals sp=1 on the ports' rows."""

import math

import pytest

from hfpatch.train.build import trainable_models
from test_train_common import TINY, cli_ok, losses, torchrun, train_env  # noqa: F401

ROWS = ["yi", "internlm1", "qwen2", "mixtral", "internlm2", "baichuan2", "mamba"]


def test_every_patched_decoder_row_is_covered():
    # llava and flux: tests/test_train_multimodal.py
    assert set(trainable_models()) == {"llama2", *ROWS, "llava", "flux"}


@pytest.mark.parametrize("row", ROWS)
def test_train_runs_and_records_finite_losses(train_env, tmp_path, row):
    cli_ok(row, *TINY, "--steps", "2", "--out", tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve)


@pytest.mark.parametrize("row", ["internlm2", "mixtral"])
def test_isp_sp2_curve_equals_sp1(train_env, tmp_path, row):
    common = [*TINY, "--steps", "2", "--dtype", "float32", "--seed", "3"]
    cli_ok(row, *common, "--out", tmp_path / "sp1")
    torchrun(row, *common, "--sp", "2", "--out", tmp_path / "sp2")
    assert losses(tmp_path / "sp2") == pytest.approx(losses(tmp_path / "sp1"), rel=1e-5)
