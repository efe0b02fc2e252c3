"""`hfpatch train ROW` runs for every trainable zoo row, and ISP sp=2 (Mamba: with FSDP2 wp=2) equals one
process on the ports', Mixtral's and Mamba's rows."""

import math

import pytest

from hfpatch.train.families import trainable_models
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


@pytest.mark.parametrize("row, layout", [
    ("internlm2", ["--sp", "2"]),
    ("mixtral", ["--sp", "2"]),
    ("mamba", ["--sp", "2", "--wp", "2"]),  # the state hand-off between ranks, with FSDP2 over MambaBlocks
])
def test_isp_curve_equals_one_process(train_env, tmp_path, row, layout):
    common = [*TINY, "--steps", "2", "--dtype", "float32", "--seed", "3"]
    cli_ok(row, *common, "--out", tmp_path / "one")
    torchrun(row, *common, *layout, "--out", tmp_path / "isp")
    assert losses(tmp_path / "isp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
