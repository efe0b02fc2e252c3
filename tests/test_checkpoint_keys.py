"""Official checkpoints load into the patched classes: the Llama-architecture rows with their own key names
and config keys, LLaVA and Mixtral through transformers' own checkpoint conversions."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfpatch import modeling, zoo
from hfpatch.train.build import pretrained_config

LAYERS, HIDDEN, FFN, HEADS, VOCAB = 2, 32, 64, 4, 96


def official_layout(bias: bool) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of internlm/internlm-7b (bias=True, its remote code) and 01-ai/Yi-6B
    (bias=False, Llama format), scaled down: both use the Llama names."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
            if bias:
                shapes[f"model.layers.{i}.self_attn.{proj}.bias"] = (HIDDEN,)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (FFN, HIDDEN)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (FFN, HIDDEN)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (HIDDEN, FFN)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    return shapes


def test_internlm1_official_checkpoint_loads_with_biases(zoo_copy, tmp_path):
    entry = zoo.resolve("internlm1")
    cls = modeling.model_class(entry)
    config_json = {  # the hub config's own keys: model_type "internlm", the bias switch named "bias"
        "architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True, "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "vocab_size": VOCAB, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in official_layout(True).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    config = pretrained_config(entry, cls, str(tmp_path))
    assert config.attention_bias is True
    model, info = cls.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_yi_official_keys_are_llama_keys(zoo_copy):
    entry = zoo.resolve("yi")
    model = modeling.build_model(entry, modeling.tiny_config(
        entry, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_layout(False)


@pytest.mark.parametrize("name", ["llava", "mixtral"])
def test_checkpoints_transformers_converts_on_load_load_into_the_patched_class(zoo_copy, tmp_path, name):
    """transformers 5.x writes LLaVA in its legacy key layout and Mixtral with per-expert weights, and converts
    them back on load -- for its own classes only. The patched class must load them just the same."""
    import transformers

    entry = zoo.resolve(name)
    patched = modeling.model_class(entry)
    stock_class = getattr(transformers, entry.model_class)
    config = modeling.tiny_config(entry)
    torch.manual_seed(0)
    stock = stock_class(config)
    stock.save_pretrained(tmp_path)
    on_disk = set(load_file(tmp_path / "model.safetensors"))
    assert on_disk != set(stock.state_dict())  # the file really is in another layout
    model, info = patched.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    assert loaded.keys() == stock.state_dict().keys()
    for key, value in stock.state_dict().items():
        assert torch.equal(loaded[key], value), key
