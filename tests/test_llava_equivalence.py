"""What is special to the patched LLaVA: the language model (transformers' unpatched Llama) switches its
attention implementation per forward, the attention function it registers works for any model or refuses, the
conformance ISP runs really split an image, and the patch renders for InternEvo (the conformance suite has the
rest: runtime off, packed == each sample alone, checkpointing, labels and ISP)."""

import copy
import py_compile

import pytest
import torch
import transformers
from click.testing import CliRunner

from conformance import ATOL, case, lm_logits
from hfpatch import engines, modeling, pins, runtime, zoo
from hfpatch.cli import main


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


def test_after_a_packed_step_the_unpacked_model_is_transformers_again():
    adapter = case("llava")
    patched, reference = adapter.build({})
    pack = adapter.packs(patched)[0]
    adapter.forward(patched, pack)
    assert patched.config.text_config._attn_implementation == "internevo_varlen"
    sample = pack["samples"][0]
    ids = torch.tensor([sample.input_ids])
    out_p = patched(input_ids=ids, pixel_values=sample.pixel_values).logits
    assert patched.config.text_config._attn_implementation == "sdpa"
    torch.testing.assert_close(out_p, reference(input_ids=ids, pixel_values=sample.pixel_values).logits,
                               atol=ATOL, rtol=0)


def _attention_users(model_type: str, **extra):
    """A transformers model of ``model_type`` (unpatched) on sdpa, and a copy that selects internevo_varlen."""
    config = getattr(transformers, f"{model_type}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    plain = getattr(transformers, f"{model_type}ForCausalLM")(copy.deepcopy(config)).double()
    internevo = getattr(transformers, f"{model_type}ForCausalLM")._from_config(
        config, attn_implementation="internevo_varlen").double()
    internevo.load_state_dict(plain.state_dict())
    return plain, internevo


@pytest.mark.parametrize("model_type, extra", [
    ("Llama", {}),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # the window kept
], ids=["llama", "qwen2-sliding"])
def test_the_registered_attention_is_correct_for_any_model_given_the_pack(model_type, extra):
    """Importing the patched LLaVA registers internevo_varlen with transformers for every model: a model that
    selects it and gets the pack as keyword arguments equals its documents run alone through sdpa; without a
    pack (and no ISP) it refuses with a message saying what to pass, not a stale-pack error."""
    modeling.load_patched_module(zoo.resolve("llava"))
    plain, internevo = _attention_users(model_type, **extra)
    docs = [[5, 9, 3, 7, 1, 2], [4, 4, 8, 9, 10, 11, 12, 13, 3, 2, 5], [6, 7, 8]]
    row = runtime.build_packed_row(docs)
    packed = lm_logits(internevo, input_ids=row.input_ids[None], position_ids=row.position_ids[None],
                       packed_cu_seqlens=row.cu_seqlens, packed_max_seqlen=row.max_seqlen)[0]
    alone = torch.cat([lm_logits(plain, input_ids=torch.tensor([doc]))[0] for doc in docs])
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="runs packed rows or ISP only: pass the pack to the model's forward as "
                                         "packed_cu_seqlens= and packed_max_seqlen="):
        internevo(input_ids=row.input_ids[None])


def _image_tokens_per_slice(input_ids, image_token_id, sp):
    local = input_ids.shape[-1] // sp
    return [int(input_ids[..., r * local:(r + 1) * local].eq(image_token_id).sum()) for r in range(sp)], local


def test_the_conformance_isp_runs_split_an_image_between_ranks():
    """The layouts the conformance ISP runs use: at sp=2 an image block straddles the two slices of the pack
    and of each unpacked row; at sp=4 one rank holds no image token."""
    adapter = case("llava")
    patched, _ = adapter.build({})
    image_token = patched.config.image_token_id
    ids = adapter.packs(patched)[0]["input_ids"][0]
    for sp in (2, 4):
        counts, local = _image_tokens_per_slice(ids, image_token, sp)
        assert any(ids[r * local - 1] == ids[r * local] == image_token for r in range(1, sp))
        assert (0 in counts) == (sp == 4)
    rows = adapter.rows(patched)["input_ids"]
    _, local = _image_tokens_per_slice(rows, image_token, 2)
    assert rows[:, local - 1:local + 1].eq(image_token).all()


def test_patch_imports_only_the_runtime_api_and_renders_for_internevo(zoo_copy, tmp_path):
    text = pins.default_patch_path(zoo.resolve("llava")).read_text()
    for line in engines.ENGINE_IMPORTS["hfpatch"]:
        assert text.count(f"\n+{line}\n") == 1
    hfpatch_imports = [line for line in text.splitlines() if line.startswith("+") and "hfpatch" in line and "import" in line]
    assert len(hfpatch_imports) == 4
    runner = CliRunner()
    for args in (["sync", "llava"], ["apply", "llava", "--engine", "internevo"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    path = zoo_copy / "llava_hf/llava_1_5_7b_hf/modeling_llava.py"
    assert "hfpatch" not in path.read_text()
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
