"""--export writes an HF checkpoint that plain transformers loads with identical logits."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig

from hfpatch import modeling, zoo
from hfpatch.train.checkpoint import complete_checkpoints
from hfpatch.train.tokenizer import load_tokenizer
from test_train_common import TINY, cli_ok, train_env  # noqa: F401

TEXT = "The assert statement\n\nAssert statements are a convenient way to insert debugging assertions."

PLAIN = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, out = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(sys.argv[3], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert not [m for m in sys.modules if m.startswith("hfpatch")], "hfpatch was imported"
    torch.save({"ids": ids, "logits": logits, "class": type(model).__module__}, out)
""")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_reloads_in_plain_transformers_with_identical_logits(train_env, tmp_path):
    run, hf = tmp_path / "run", tmp_path / "hf"
    cli_ok("llama2", *TINY, "--steps", "2", "--out", run, "--export", hf)
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file()

    subprocess.run([sys.executable, "-c", PLAIN, hf, tmp_path / "plain.pt", TEXT], check=True, cwd=tmp_path, timeout=120)
    plain = torch.load(tmp_path / "plain.pt")
    assert plain["class"].startswith("transformers.models.llama")

    # The same weights read back from the run's own sharded checkpoint into the patched class.
    entry = zoo.resolve("llama2")
    model = modeling.model_class(entry)(AutoConfig.from_pretrained(hf)).eval()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=complete_checkpoints(run / "checkpoints")[-1] / "dcp")
    model.load_state_dict(state["model"])
    ids = torch.tensor([load_tokenizer(hf).hf(TEXT).input_ids])
    assert torch.equal(ids, plain["ids"])
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(plain["logits"], expected, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_missing_weights_is_refused_unless_allowed(train_env, tmp_path):
    from safetensors.torch import load_file, save_file

    from test_train_common import cli

    hf = tmp_path / "hf"
    cli_ok("llama2", *TINY, "--steps", "1", "--out", tmp_path / "run", "--export", hf)
    weights = load_file(hf / "model.safetensors")
    dropped = [k for k in weights if k.startswith("model.layers.1.") or k == "lm_head.weight"]
    assert dropped and "lm_head.weight" in dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, hf / "model.safetensors", metadata={"format": "pt"})

    result = cli("llama2", "--model-path", hf, *TINY, "--steps", "1", "--out", tmp_path / "tuned")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --model-path {hf} does not match the model: {len(dropped)} missing (")
    assert "--allow-missing-weights" in lines[0]
    assert not (tmp_path / "tuned" / "checkpoints").exists()

    allowed = cli_ok("llama2", "--model-path", hf, *TINY, "--steps", "1", "--out", tmp_path / "tuned", "--allow-missing-weights")
    assert f"{len(dropped)} missing" in allowed.output
