"""`hfpatch train` bad inputs: one `error: ...` line and exit status 1, never a traceback."""

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from hfpatch import actions, zoo
from test_train_common import REPO, TINY, cli, train_env  # noqa: F401


def jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture
def small_model_dir(tmp_path):
    """A local HF checkpoint with vocab 128 and no tokenizer."""
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


CASES = {
    "unknown model": (lambda t: ["lama2"], "error: unknown model 'lama2'; did you mean"),
    "option an image model does not take": (
        lambda t: ["flux", "--padded"], "error: --padded is not supported for flux (diffusion-transformer) yet"),
    "missing data file": (lambda t: ["llama2", "--data", t / "missing.jsonl"], "does not exist"),
    "corrupt data file": (
        lambda t: ["llama2", "--data", _write(t / "bad.jsonl", '{"text": "a"}\n{"text": \n')], "bad.jsonl line 2 is not valid JSON"),
    "empty dataset": (lambda t: ["llama2", "--data", _write(t / "empty.jsonl", "")], "no documents with text"),
    "document longer than seq_len": (
        lambda t: ["llama2", "--data", jsonl(t / "long.jsonl", ["short", "word " * 400])],
        "more than seq_len=128; raise --seq-len or split long documents with --overflow split"),
    "tokenizer larger than model vocab": (lambda t: ["llama2", "--set", "model.vocab_size=100"],
                                          "the tokenizer has 1024 tokens but model.vocab_size=100"),
    "unknown config key": (lambda t: ["llama2", "--set", "data.seqlen=64"], "did you mean data.seq_len?"),
    "unknown model setting": (lambda t: ["llama2", "--set", "model.num_layers=3"], "unknown config key 'model.num_layers'"),
    "sp larger than the world": (lambda t: ["llama2", "--sp", "2"], "parallel.tensor.size=2 (--sp) does not divide the world size 1"),
    "nproc not divisible by sp": (lambda t: ["llama2", "--nproc", "3", "--sp", "2"], "does not divide the world size 3"),
    "bad config file": (lambda t: ["llama2", "-c", _write(t / "c.py", "import os\n")], "only assignments are allowed"),
    "missing config file": (lambda t: ["llama2", "-c", t / "none.py"], "config file"),
    "bad resume path": (lambda t: ["llama2", "--resume", t / "nowhere"], "--resume must be auto, never or an existing checkpoint path"),
    "tokenizer dir missing": (lambda t: ["llama2", "--tokenizer", t / "tok"], "does not exist"),
    "chunked loss on a head that is not a plain projection": (
        lambda t: ["baichuan2", "--loss-chunk", "32"],
        "--loss-chunk is not supported for baichuan2: it has a BaichuanNormHead output head"),
    "chunked loss on a model with no LM head": (
        lambda t: ["flux", "--loss-chunk", "32"], "--loss-chunk is not supported for flux (diffusion-transformer)"),
}


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_a_nonzero_exit(train_env, tmp_path, case):
    make_args, message = CASES[case]
    result = cli(*make_args(tmp_path), *TINY, "--steps", "1", "--out", tmp_path / "run")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]


def test_model_checkpoint_vocab_smaller_than_the_tokenizer(train_env, tmp_path, small_model_dir):
    result = cli("llama2", "--model-path", small_model_dir, *TINY, "--steps", "1", "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: the tokenizer has 1024 tokens but the model at {small_model_dir} has vocab_size=128; "
        "use the model's own tokenizer (--tokenizer DIR)"
    ]


def test_print_config_and_module_entry_point(train_env, tmp_path):
    result = cli("llama2", "--sp", "2", "--set", "model.hidden_size=128", "--print-config")
    config = json.loads(result.output)
    assert config["parallel"]["tensor"]["size"] == 2 and config["model"]["hidden_size"] == 128
    proc = subprocess.run([sys.executable, "-m", "hfpatch.train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0
    for option in ("--sp", "--wp", "--nproc", "--export", "--resume", "--packed / --padded", "--activation-checkpointing"):
        assert option in proc.stdout


def test_training_leaves_the_zoo_files_as_they_are(train_env, tmp_path):
    """The trainer imports a patched copy from the cache; the user's zoo checkout is not touched."""
    entry = zoo.resolve("llama2")
    actions.sync(entry)
    before = actions.status(entry)
    result = cli("llama2", *TINY, "--steps", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert actions.status(entry) == before and {s.state for s in before} == {"pristine"}


def test_steps_run_with_setups_objects_out_of_full_collections(train_env, tmp_path, monkeypatch):
    """The loop's steps run with what setup built frozen out of the garbage collector's scans (they stalled
    steps on GPU); the freeze ends with the run."""
    import gc

    from hfpatch.train import loop

    frozen_during_steps = []

    def spying_step(*args, **kwargs):
        frozen_during_steps.append(gc.get_freeze_count())
        return real_step(*args, **kwargs)

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", spying_step)
    result = cli("llama2", *TINY, "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(frozen_during_steps) == 2 and min(frozen_during_steps) > 1000
    assert gc.get_freeze_count() == 0
