"""Config files, CLI overrides and their validation; LR schedule; fault specs."""

import math
import re

import pytest

from hfpatch.train.config import check_world_size, resolve_config
from hfpatch.train.errors import ConfigError
from hfpatch.train.faults import Fault, parse_faults
from hfpatch.train.loop import preflight
from hfpatch.train.optim import lr_factor
from hfpatch.train.pyconfig import parse_config_text
from test_train_common import REPO, train_env  # noqa: F401

INTERNEVO_STYLE = '''
"""docstring"""
SEQ_LEN = 2 * 128
MICRO = 2
parallel = dict(tensor=dict(size=2, mode="isp"), weight=dict(size=2), zero1=dict(size=-1))
data = dict(seq_len=SEQ_LEN, micro_bsz=1, micro_num=MICRO + 1, use_packed_dataset=True)
model = dict(hidden_size=128, checkpoint=True)
lr = 1e-3
total_steps = 7
adam_betas = (0.9, 0.99)
'''


def write(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return path


def test_internevo_style_file_with_variables_and_arithmetic(tmp_path):
    cfg = resolve_config("llama2", write(tmp_path, INTERNEVO_STYLE))
    assert (cfg.sp, cfg.wp, cfg.seq_len, cfg.micro_num, cfg.total_steps) == (2, 2, 256, 3, 7)
    assert cfg.activation_checkpointing is True and cfg.model_overrides == {"hidden_size": 128}
    assert cfg.packed is True and cfg.lr == 1e-3 and tuple(cfg.adam_betas) == (0.9, 0.99)


def test_cli_overrides_beat_the_file_and_set_reaches_any_key(tmp_path):
    cfg = resolve_config(
        "llama2", write(tmp_path, INTERNEVO_STYLE),
        {"parallel.tensor.size": 4, "total_steps": 3, "data.use_packed_dataset": False, "lr": None},
        ["data.seq_len=64", "model.num_hidden_layers=3"],
    )
    assert (cfg.sp, cfg.total_steps, cfg.packed, cfg.seq_len, cfg.lr) == (4, 3, False, 64, 1e-3)
    assert cfg.model_overrides == {"hidden_size": 128, "num_hidden_layers": 3}


def test_parallel_sizes_accept_internevo_int_shorthand():
    assert parse_config_text("parallel = dict(tensor=2)")["parallel"] == {"tensor": 2}
    cfg = resolve_config("llama2", overrides={"parallel": {"tensor": 2, "weight": 4}})
    assert (cfg.sp, cfg.wp) == (2, 4)


@pytest.mark.parametrize("text, message", [
    ("import os", "only assignments are allowed"),
    ("x = open('/etc/passwd')", "unsupported expression"),
    ("lr = __import__('os')", "unsupported expression"),
    ("data = dict(**OTHER)", "unpacking is not supported"),
    ("data = dict(seq_len=SEQ)", "not defined earlier"),
    ("lr = 1e-3 +", "invalid python syntax"),
    ("a.b = 1", "only simple 'name = value' assignments"),
])
def test_config_files_are_parsed_not_executed(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_config("llama2", write(tmp_path, text))
    assert "cfg.py:1" in str(info.value)


def test_the_config_language_of_internevo_files():
    names = parse_config_text(
        'A = 4\nNAME = "org/m"\nB = int(A / 3) + 2 ** 3 - -1\n'
        'JOB = f"train_{NAME}/{A:03d}_{A * 0.5!r}"\n'
        'd = dict(x=A, y=[1, 2, 3], z=(A, "a"))\n'
        'e = dict(total=d["x"] * 2, first=d["y"][0], tail=d["y"][1:], pair=d["z"][-1])\n'
        'flags = (A > 3, A == 4 and B != 0, 1 < A <= 4, "m" in NAME, None is None, not A)\n'
        'pick = "big" if A >= 4 else "small"\n'
        'calls = (float(A), str(A), bool(0), round(2 / 3, 2), abs(-A), min(A, 2), max(1, A), len(NAME), '
        'list((1,)), tuple([2]), dict(d, x=0)["x"], sum([1, 2]), sorted([2, 1]))\n'
        '"""a string between assignments"""\n'
    )
    assert names["B"] == 10 and names["JOB"] == "train_org/m/004_2.0"
    assert names["e"] == {"total": 8, "first": 1, "tail": [2, 3], "pair": "a"}
    assert names["flags"] == (True, True, True, True, True, False) and names["pick"] == "big"
    assert names["calls"] == (4.0, "4", False, 0.67, 4, 2, 4, 5, [1], (2,), 0, 3, [1, 2])


@pytest.mark.parametrize("text, message", [
    ("x = 'a'.upper()", "unsupported expression \"'a'.upper()\""),
    ("import os\nx = os.sep", "only assignments are allowed"),
    ("x = [i for i in range(3)]", "unsupported expression"),
    ("x = (lambda: 1)()", "unsupported expression"),
    ("x = int('seven')", "cannot evaluate \"int('seven')\": ValueError"),
    ("d = dict(a=1)\nx = d['b']", "cannot evaluate \"d['b']\": KeyError"),
    ("x = max(*[1, 2])", "unpacking is not supported"),
])
def test_the_language_stops_at_anything_else(text, message):
    with pytest.raises(ConfigError, match="<config>:\\d+: .*" + re.escape(message)):
        parse_config_text(text)


@pytest.mark.parametrize("text, message", [
    ("data = dict(seqlen=128)", "unknown config key 'data.seqlen'; did you mean data.seq_len?"),
    ("totl_steps = 3", "unknown config key 'totl_steps'; did you mean total_steps?"),
    ("parallel = dict(tensr=dict(size=2))", "did you mean parallel.tensor?"),
    ("data = dict(seq_len='long')", "data.seq_len must be int"),
    ("data = dict(use_packed_dataset=1)", "data.use_packed_dataset must be bool"),
    ("parallel = dict(tensor=dict(size=2, mode='mtp'))", "parallel.tensor.mode must be one of isp"),
    ("parallel = dict(pipeline=dict(size=2))", "parallel.pipeline.size must be one of 1"),
    ("total_steps = 0", "total_steps must be >= 1"),
    ("adam_betas = (0.9,)", "adam_betas must be two numbers"),
])
def test_bad_settings_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=_escaped(message)):
        resolve_config("llama2", write(tmp_path, text))


def _escaped(message):
    return re.escape(message)


def test_sizes_that_do_not_divide_the_world_say_which():
    cfg = resolve_config("llama2", overrides={"parallel.tensor.size": 3, "parallel.weight.size": 2})
    with pytest.raises(ConfigError, match=_escaped("parallel.tensor.size=3 (--sp) does not divide the world size 4")):
        check_world_size(cfg, 4)
    cfg = resolve_config("llama2", overrides={"parallel.weight.size": 3})
    with pytest.raises(ConfigError, match=_escaped("parallel.weight.size=3 (--wp) does not divide the world size 4")):
        check_world_size(cfg, 4)
    cfg = resolve_config("llama2", overrides={"parallel.tensor.size": 2})
    with pytest.raises(ConfigError, match="--nproc"):
        check_world_size(cfg, 1)
    check_world_size(cfg, 2)


def test_unknown_model_override_is_caught_before_launch(train_env):
    cfg = resolve_config("llama2", assignments=["model.hiden_size=32"])
    with pytest.raises(ConfigError, match=_escaped("did you mean model.hidden_size?")):
        preflight(cfg, world=1)
    cfg = resolve_config("llama2", overrides={"parallel.tensor.size": 8})
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by the sequence parallel size 8"):
        preflight(cfg, world=8)


def test_example_configs_resolve_and_pass_preflight(train_env):
    files = sorted((REPO / "configs").glob("*.py"))
    assert len(files) >= 2
    for path in files:
        cfg = resolve_config("internlm1" if "internlm1" in path.name else "llama2", path)
        if cfg.model_path is None and cfg.data_path is None:
            preflight(cfg, world=max(cfg.sp, cfg.wp) * 2)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    factors = [lr_factor(s, warmup=4, total=20, final_ratio=0.1) for s in range(1, 21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert math.isclose(factors[-1], 0.1) and math.isclose(factors[11], 0.1 + 0.9 * 0.5, rel_tol=1e-9)


def test_fault_specs_parse():
    assert parse_faults("exit:rank=1:step=3:attempt=0; nan:step=2") == [
        Fault(kind="exit", step=3, rank=1, attempt=0), Fault(kind="nan", step=2),
    ]
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_faults("boom:step=1")
