"""scripts/profile_trainer.py profiles the real trainer's steps, and says so when the run ends before them."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_trainer.py"
TINY = ["llama2", "--seq-len", "128", "--micro-num", "1", "--set", "save_checkpoints=false",
        "--set", "model.hidden_size=32", "--set", "model.intermediate_size=64", "--set", "model.num_hidden_layers=1",
        "--set", "model.num_attention_heads=2", "--set", "model.num_key_value_heads=2"]


def _profile(tmp_path, steps):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--profile-steps", "2", "3", "--",
                          *TINY, "--steps", str(steps), "--out", str(tmp_path / f"run{steps}")],
                         capture_output=True, text=True, timeout=300)
    return run, out


def test_profiles_the_trainer_steps_it_is_given(tmp_path):
    run, out = _profile(tmp_path, steps=3)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["wall_ms_per_step"] > 0
    assert report["command"][0] == "llama2"
    assert any(op["op"].startswith("aten::") for op in report["top_cpu_ops"])  # the model's ops were recorded


def test_a_run_that_ends_before_the_window_says_so(tmp_path):
    run, out = _profile(tmp_path, steps=2)
    assert run.returncode == 1 and not out.exists()
    assert run.stderr.strip().splitlines()[-1] == "the run ended before step 3: no profile (give it --steps 3 or more)"
