"""The first-party InternLM2 port and its patch, against independent references.

References: transformers' own ``LlamaForCausalLM`` holding the same weights re-laid out
(the re-layout is written here from the official checkpoint layout, not taken from the
port) and the official key list (also written here). The patch itself (runtime off, packed,
ISP, checkpointing, labels) is checked by the conformance suite against the unpatched port.

The first half of this file is the machinery every port test shares (``PortCase`` and
the ``check_*`` functions); ``test_baichuan2_port.py`` imports it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

from conformance import ATOL, unpatched_port_class
from hfpatch import engines, modeling, pins, zoo
from hfpatch.cli import main as cli


# --------------------------------------------------------------------------- shared machinery


@dataclass(frozen=True)
class PortCase:
    name: str  # zoo name
    official_shapes: Callable  # config -> {state-dict key: shape} of the official checkpoint
    to_llama: Callable  # (official state dict, config) -> transformers Llama state dict
    llama_config: Callable  # config -> transformers.LlamaConfig
    official_config_json: Callable  # config -> the official config.json's keys (sizes from config)


@dataclass
class Port:
    entry: zoo.Entry
    unpatched: type  # the committed port, as published (no runtime import)
    patched: type  # the zoo's patched class


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_port(name: str) -> Port:
    entry = zoo.resolve(name)
    return Port(entry, unpatched_port_class(entry), modeling.model_class(entry))


def config_values(entry: zoo.Entry, overrides: dict) -> dict:
    values = {**entry.test_config, **overrides}
    values.pop("model_type", None)
    return values


def left_padded_batch(vocab: int):
    ids = torch.randint(1, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, exercising transformers' own mask path
    return ids, mask


def official_state_dict(shapes: dict, seed: int = 0) -> dict:
    """Random float64 tensors under the official names: norms near one, everything else small."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        out[key] = 1 + 0.1 * noise if key.endswith("norm.weight") else 0.1 * noise
    return out


def check_matches_llama(case: PortCase, port: Port, overrides: dict) -> None:
    """Official-layout weights load strictly; re-laid out into LlamaForCausalLM they give the same outputs."""
    config = port.unpatched.config_class(**config_values(port.entry, overrides))
    shapes = case.official_shapes(config)
    official = official_state_dict(shapes)
    model = port.unpatched(config).double()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    result = model.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    llama = transformers.LlamaForCausalLM(case.llama_config(config)).double()
    llama.load_state_dict(case.to_llama(official, config), strict=True)

    ids, mask = left_padded_batch(config.vocab_size)
    out, ref = model(input_ids=ids, attention_mask=mask, labels=ids), llama(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)
    generated = model.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(generated, llama.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True))


def check_from_pretrained_official_checkpoint(case: PortCase, port: Port, tmp_path: Path) -> None:
    """A checkpoint dir shaped like the hub's (official config.json keys, official tensor names) loads
    through ``from_pretrained`` with nothing missing, unexpected or mismatched, and computes the same."""
    config = port.unpatched.config_class(**config_values(port.entry, {}))
    official = official_state_dict(case.official_shapes(config))
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(case.official_config_json(config), indent=2))
    save_file({k: v.contiguous() for k, v in official.items()}, str(directory / "model.safetensors"))

    loaded, info = port.unpatched.from_pretrained(str(directory), dtype=torch.float64, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}
    for key, value in case.official_config_json(config).items():  # config.json's values came through
        if key not in ("torch_dtype", "transformers_version", "rope_scaling", "rope_theta", "attn_implementation"):
            assert getattr(loaded.config, key) == value, key
    assert loaded.config.rope_parameters["rope_theta"] == case.official_config_json(config).get("rope_theta", 10000)
    direct = port.unpatched(loaded.config).double()
    direct.load_state_dict(official, strict=True)
    ids, _ = left_padded_batch(config.vocab_size)
    torch.testing.assert_close(loaded(ids).logits, direct(ids).logits, atol=ATOL, rtol=0)
    assert port.unpatched.config_class.from_pretrained(str(directory)).model_type == case.official_config_json(config)["model_type"]


def _cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def check_patch_roundtrip(name: str, tmp_path: Path) -> None:
    """`hfpatch check` is clean; GNU patch and `hfpatch apply` give the same bytes (the header's post-image);
    applying twice is a no-op; revert is byte-exact; the internevo engine renders, compiles and reverts."""
    entry = zoo.resolve(name)
    _cli("sync", name)  # the port's pristine source is copied beside it, like an upstream file
    target = entry.directory / entry.patch_target
    patch_path = pins.default_patch_path(entry)
    pristine = target.read_bytes()
    assert sha256(pristine) == entry.upstream.files[entry.patch_target]
    header = pins.read_header(patch_path.read_text())
    assert header["pre-image-sha256"] == sha256(pristine)
    for line in engines.ENGINE_IMPORTS[engines.DEFAULT_ENGINE]:  # exactly once each, so engines can rewrite them
        assert patch_path.read_text().split("\n").count(f"+{line}") == 1

    _cli("check", name)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    shutil.copy(target, gnu / entry.patch_target)
    dry = subprocess.run(["patch", "--dry-run", "--fuzz=0", "--batch", entry.patch_target, str(patch_path)], cwd=gnu,
                         capture_output=True, text=True)
    assert dry.returncode == 0 and (gnu / entry.patch_target).read_bytes() == pristine, dry.stdout + dry.stderr
    done = subprocess.run(["patch", "--fuzz=0", "--batch", "-s", entry.patch_target, str(patch_path)], cwd=gnu,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    assert "patched" in _cli("apply", name).output
    patched = target.read_bytes()
    assert patched == (gnu / entry.patch_target).read_bytes()
    assert sha256(patched) == header["post-image-sha256"]
    assert "already patched" in _cli("apply", name).output and target.read_bytes() == patched
    assert "patched" in _cli("status", name).output
    _cli("revert", name)
    assert target.read_bytes() == pristine

    _cli("apply", name, "--engine", "internevo")
    text = target.read_text()
    for line in engines.ENGINE_IMPORTS["internevo"]:
        assert f"\n{line}\n" in text
    assert "hfpatch.runtime" not in text
    compile(text, str(target), "exec")
    _cli("revert", name)
    assert target.read_bytes() == pristine


def check_reset_parameters(port: Port, overrides: dict, input_proj: str, scaled: tuple[str, ...],
                           embedding: str, head: str) -> None:
    """InternEvo's init: normal(std) for embeddings, input projections and the head; std/sqrt(2(l+1)) for
    output projections and the feed-forward of layer l; biases zero."""
    std = 0.05
    model = port.patched(port.patched.config_class(**config_values(port.entry, overrides)))
    model.reset_parameters(std)
    params = dict(model.named_parameters())

    def close(key, expected):
        actual = params[key].std().item()
        assert abs(actual - expected) < 0.1 * expected, (key, actual, expected)

    close(embedding, std)
    close(head, std)
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        close(prefix + input_proj, std)
        for key in scaled:
            close(prefix + key, std / (2 * (layer + 1)) ** 0.5)
    biases = [p for key, p in params.items() if key.endswith("bias")]
    assert all(torch.count_nonzero(p) == 0 for p in biases)


# --------------------------------------------------------------------------- InternLM2


def internlm2_shapes(config) -> dict:
    """The official internlm/internlm2-7b tensor names and shapes (modeling_internlm2.py on the hub)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    shapes = {"model.tok_embeddings.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "attention.wqkv.weight"] = ((heads + 2 * kv) * d, h)
        if config.bias:
            shapes[p + "attention.wqkv.bias"] = ((heads + 2 * kv) * d,)
        shapes[p + "attention.wo.weight"] = (h, heads * d)
        if config.bias:
            shapes[p + "attention.wo.bias"] = (h,)
        shapes[p + "feed_forward.w1.weight"] = (i, h)
        shapes[p + "feed_forward.w3.weight"] = (i, h)
        shapes[p + "feed_forward.w2.weight"] = (h, i)
        shapes[p + "attention_norm.weight"] = (h,)
        shapes[p + "ffn_norm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["output.weight"] = (v, h)
    return shapes


def internlm2_to_llama(sd: dict, config) -> dict:
    """Split the grouped wqkv -- per kv head: its q_per_kv query heads, one key head, one value head --
    into Llama's q/k/v projections (query head j*q_per_kv + r belongs to kv head j in both layouts)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d, group = config.hidden_size // heads, heads // kv
    out = {
        "model.embed_tokens.weight": sd["model.tok_embeddings.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for n in range(config.num_hidden_layers):
        src, dst = f"model.layers.{n}.", f"model.layers.{n}."
        for suffix in ("weight", "bias") if config.bias else ("weight",):
            packed = sd[f"{src}attention.wqkv.{suffix}"]
            grouped = packed.reshape(kv, group + 2, d, -1)
            parts = {"q_proj": grouped[:, :group], "k_proj": grouped[:, group], "v_proj": grouped[:, group + 1]}
            for proj, tensor in parts.items():
                tensor = tensor.reshape(-1, packed.shape[-1]) if suffix == "weight" else tensor.reshape(-1)
                out[f"{dst}self_attn.{proj}.{suffix}"] = tensor
            out[f"{dst}self_attn.o_proj.{suffix}"] = sd[f"{src}attention.wo.{suffix}"]
        out[dst + "mlp.gate_proj.weight"] = sd[src + "feed_forward.w1.weight"]
        out[dst + "mlp.up_proj.weight"] = sd[src + "feed_forward.w3.weight"]
        out[dst + "mlp.down_proj.weight"] = sd[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
    return out


def internlm2_llama_config(config) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), attention_bias=config.bias, mlp_bias=False,
        pad_token_id=config.pad_token_id, tie_word_embeddings=False,
    )


def internlm2_config_json(config) -> dict:
    """internlm/internlm2-7b's config.json keys (values of the tiny config where they are sizes)."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": config.bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.2",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


INTERNLM2 = PortCase("internlm2", internlm2_shapes, internlm2_to_llama, internlm2_llama_config, internlm2_config_json)


@pytest.fixture
def port(session_zoo):
    return load_port("internlm2")


@pytest.mark.parametrize("overrides", [
    {},  # the manifest's tiny config: GQA, 4 query heads over 2 kv heads, no bias
    {"num_key_value_heads": 4, "bias": True},  # MHA, biases on wqkv and wo
    {"num_key_value_heads": 1},  # MQA
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8},  # hub-style NTK scaling, in use
], ids=["gqa", "mha-bias", "mqa", "dynamic-rope"])
def test_port_equals_transformers_llama_after_relayout(port, overrides):
    check_matches_llama(INTERNLM2, port, overrides)


def test_official_checkpoint_dir_loads_with_no_missing_or_unexpected_keys(port, tmp_path):
    check_from_pretrained_official_checkpoint(INTERNLM2, port, tmp_path)


def test_reset_parameters_is_internevo_init(port):
    check_reset_parameters(port, {"bias": True}, "attention.wqkv.weight",
                           ("attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
                            "feed_forward.w2.weight"), "model.tok_embeddings.weight", "output.weight")


def test_patch_gnu_parity_apply_revert_byte_exact(zoo_copy, tmp_path):
    check_patch_roundtrip("internlm2", tmp_path)
