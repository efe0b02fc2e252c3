"""Shared helpers for the trainer tests (imported by the other test_train_* files)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from hfpatch.train.command import train
from zoo_helpers import copy_zoo

REPO = Path(__file__).resolve().parent.parent
# Small and quick: the manifest's tiny Llama (2 layers, hidden 64), short rows.
TINY = ["--seq-len", "128", "--micro-num", "2"]
# A short run with checkpoints, for the recovery tests.
COMMON = [*TINY, "--steps", "6", "--checkpoint-every", "2", "--seed", "3"]


@functools.lru_cache(maxsize=None)
def train_dirs() -> Path:
    """A private zoo copy and cache dir, made once per test process, shared by all modules."""
    base = Path(tempfile.mkdtemp(prefix="hfpatch-train-tests-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    copy_zoo(base)  # the trainer syncs upstream files itself
    (base / "cache").mkdir()
    return base


@pytest.fixture(scope="module")
def train_env():
    """Point hfpatch (and its subprocesses) at ``train_dirs()`` for one test module."""
    base = train_dirs()
    patch = pytest.MonkeyPatch()
    patch.setenv("HFPATCH_ZOO", str(base / "huggingface_model"))
    patch.setenv("HFPATCH_CACHE", str(base / "cache"))
    patch.setenv("OMP_NUM_THREADS", "1")
    patch.delenv("HFPATCH_FAULT", raising=False)
    yield base
    patch.undo()


@pytest.fixture(scope="module")
def uninterrupted(train_env, tmp_path_factory):
    """The losses of the COMMON run, never stopped."""
    run = tmp_path_factory.mktemp("uninterrupted")
    cli_ok("llama2", *COMMON, "--out", run)
    return losses(run)


def cli(*args: str):
    """``hfpatch train ARGS`` in this process."""
    return CliRunner().invoke(train, [str(a) for a in args])


def cli_ok(*args: str):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def module(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m hfpatch.train ARGS`` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "hfpatch.train", *map(str, args)],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def torchrun(*args: str, nproc: int = 2, max_restarts: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         f"--max-restarts={max_restarts}", "-m", "hfpatch.train", *map(str, args)],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_helpers_run_a_step(train_env, tmp_path):
    cli_ok("llama2", *TINY, "--steps", "1", "--out", tmp_path / "run")
    record = metrics(tmp_path / "run")[0]
    assert record["step"] == 1 and record["loss"] > 0 and record["tokens"] > 0
