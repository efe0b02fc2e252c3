"""The first-party Baichuan2-7B port (RoPE, stacked W_pack, NormHead) and its patch, against independent
references: transformers' ``LlamaForCausalLM`` with the same weights re-laid out here (NormHead folded in by
normalising the lm_head rows) and the official key list written here. The shared machinery lives in
``test_internlm2_port.py``; the patch's numerics (packed, ISP with the z-loss, ...) in the conformance suite."""

import pytest
import torch
import transformers

from test_internlm2_port import (
    PortCase,
    check_from_pretrained_official_checkpoint,
    check_matches_llama,
    check_patch_roundtrip,
    check_reset_parameters,
    config_values,
    load_port,
)


def baichuan_shapes(config) -> dict:
    """The official baichuan-inc/Baichuan2-7B-Base tensor names and shapes (modeling_baichuan.py on the hub)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "self_attn.W_pack.weight"] = (3 * h, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def baichuan_to_llama(sd: dict, config) -> dict:
    """W_pack rows are [q; k; v] (hidden_size each); the NormHead's effective weight is its rows scaled to unit L2 norm."""
    h = config.hidden_size
    head = sd["lm_head.weight"]
    out = {
        "model.embed_tokens.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "lm_head.weight": head / head.pow(2).sum(dim=1, keepdim=True).sqrt(),
    }
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        packed = sd[p + "self_attn.W_pack.weight"]
        for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{p}self_attn.{proj}.weight"] = packed[index * h : (index + 1) * h]
        for key in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                    "input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + key] = sd[p + key]
    return out


def baichuan_llama_config(config) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), attention_bias=False, mlp_bias=False,
        pad_token_id=config.pad_token_id, tie_word_embeddings=False,
    )


def baichuan_config_json(config) -> dict:
    """baichuan-inc/Baichuan2-7B-Base's config.json keys (values of the tiny config where they are sizes)."""
    return {
        "_from_model_config": True,
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "tokenizer_class": "BaichuanTokenizer",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_max_length": 4096,
        "model_type": "baichuan",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.29.2",
        "use_cache": True,
        "vocab_size": config.vocab_size,
        "z_loss_weight": 0,
    }


BAICHUAN2 = PortCase("baichuan2", baichuan_shapes, baichuan_to_llama, baichuan_llama_config, baichuan_config_json)


@pytest.fixture
def port(session_zoo):
    return load_port("baichuan2")


@pytest.mark.parametrize("overrides", [{}, {"num_attention_heads": 2}], ids=["4-heads", "2-heads"])
def test_port_equals_transformers_llama_after_relayout(port, overrides):
    check_matches_llama(BAICHUAN2, port, overrides)


def test_norm_head_normalises_rows_where_used_and_keeps_the_stored_weight(port):
    model = port.unpatched(port.unpatched.config_class(**config_values(port.entry, {}))).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(torch.arange(1, model.config.vocab_size + 1, dtype=torch.float64)[:, None])
    stored = model.lm_head.weight.detach().clone()
    hidden = torch.randn(3, model.config.hidden_size, dtype=torch.float64)
    expected = hidden @ (stored / stored.norm(dim=1, keepdim=True)).T
    for mode in (model.train, model.eval):  # the hub's NormHead overwrote its weight in eval; this one does not
        mode()
        torch.testing.assert_close(model.lm_head(hidden), expected, atol=1e-12, rtol=0)
        assert torch.equal(model.lm_head.weight, stored)


def test_z_loss_weight_adds_the_mean_squared_max_logit(port):
    values = config_values(port.entry, {})
    plain = port.unpatched(port.unpatched.config_class(**values)).double()
    penalised = port.unpatched(port.unpatched.config_class(**values, z_loss_weight=0.25)).double()
    penalised.load_state_dict(plain.state_dict())
    ids = torch.randint(1, values["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    out = plain(input_ids=ids, labels=ids)
    z = out.logits[:, :-1].amax(dim=-1).pow(2).mean()
    torch.testing.assert_close(penalised(input_ids=ids, labels=ids).loss, out.loss + 0.25 * z, atol=1e-12, rtol=0)


def test_official_checkpoint_dir_loads_with_no_missing_or_unexpected_keys(port, tmp_path):
    check_from_pretrained_official_checkpoint(BAICHUAN2, port, tmp_path)


def test_reset_parameters_is_internevo_init(port):
    check_reset_parameters(port, {}, "self_attn.W_pack.weight",
                           ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                            "mlp.down_proj.weight"), "model.embed_tokens.weight", "lm_head.weight")


def test_patch_gnu_parity_apply_revert_byte_exact(zoo_copy, tmp_path):
    check_patch_roundtrip("baichuan2", tmp_path)
