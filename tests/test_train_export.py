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
