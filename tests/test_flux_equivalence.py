"""What is special to the patched Flux transformer: its manifest builds, its packed layout is checked, and its
reset_parameters (the conformance suite has the rest: runtime off, packed == each sample alone, checkpointing,
ISP packed and batched)."""

import pytest
import torch

from conformance import case
from hfpatch import actions, modeling
from hfpatch.runtime.latent_packing import forward_packed


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


def test_zoo_entry_builds_from_its_manifest_and_predicts_a_velocity():
    """The import smoke of test_zoo_cli for a diffusion transformer: tiny config, reset_parameters, forward."""
    adapter = case("flux")
    entry = adapter.spec.entry
    zoo_state = actions.file_state(entry, entry.patch_target).state
    model = modeling.model_class(entry).from_config(entry.test_config)
    model.reset_parameters()
    sample = adapter.samples(model.config, [(2, 3, 4)])[0]
    out = model(**{k: v.float() for k, v in adapter.batch_inputs([sample]).items()}).sample
    assert out.shape == (1, 6, model.config.in_channels) and torch.isfinite(out).all()
    assert actions.file_state(entry, entry.patch_target).state == zoo_state  # imported from a patched copy


def test_packed_inputs_that_do_not_match_the_layout_are_refused():
    adapter = case("flux")
    patched = adapter.build_patched({})
    pack = adapter.packs(patched)[0]
    with pytest.raises(ValueError, match="txt_seqlens"):
        forward_packed(patched, {**pack, "txt_seqlens": None})
    with pytest.raises(ValueError, match="text tokens in this rank's slice"):
        forward_packed(patched, {**pack, "txt_seqlens": pack["txt_seqlens"] + torch.tensor([1, -2])})
    with pytest.raises(ValueError, match="one txt_seqlens, timestep, pooled_projections"):
        forward_packed(patched, {**pack, "timestep": pack["timestep"][:1]})


def test_reset_parameters_is_internevo_init():
    patched = case("flux").build_patched({"num_attention_heads": 4})  # 32-wide: enough weights for a std estimate
    torch.manual_seed(0)
    patched.reset_parameters(std=0.02)
    for name, param in patched.named_parameters():
        if name.endswith("bias"):
            assert not param.any(), name
        if "norm_q" in name or "norm_k" in name or "norm_added" in name:
            assert (param == 1).all(), name
    depth = len(patched.transformer_blocks) + len(patched.single_transformer_blocks)
    assert abs(patched.x_embedder.weight.std().item() / 0.02 - 1) < 0.3
    scaled = patched.single_transformer_blocks[-1].proj_out.weight.std().item()
    assert abs(scaled / (0.02 / (2 * depth) ** 0.5) - 1) < 0.1
