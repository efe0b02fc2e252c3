"""The patched Flux transformer against independent references: diffusers' unpatched model, each sample
run alone, the single-process run."""

import pytest
import torch

from hfpatch import actions, modeling, runtime
from hfpatch.train.diffusion import flow_matching_loss, forward_packed, pack_samples
from flux_cases import BATCH_SHAPE, SAMPLES, batch_inputs, entry, isp_worker, make_samples, patched_and_reference
from runtime_helpers import run_distributed

ATOL = 1e-10


@pytest.fixture(autouse=True)
def _zoo(zoo_copy):
    yield


def _assert_grads_equal(patched, reference, atol=ATOL):
    for (name, p), (_, r) in zip(patched.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=atol, rtol=0, msg=name)


def test_zoo_entry_builds_from_its_manifest_and_predicts_a_velocity():
    """The import smoke of test_zoo_cli for a diffusion transformer: tiny config, reset_parameters, forward."""
    model = modeling.model_class(entry()).from_config(entry().test_config)
    model.reset_parameters()
    sample = make_samples(model.config, [(2, 3, 4)])[0]
    out = model(**{k: v.float() for k, v in batch_inputs([sample]).items()}).sample
    assert out.shape == (1, 6, model.config.in_channels) and torch.isfinite(out).all()
    assert actions.file_state(entry(), entry().patch_target).state == "patched"


def test_no_runtime_patched_equals_unpatched_forward_backward():
    patched, reference = patched_and_reference()
    samples = make_samples(patched.config, [BATCH_SHAPE] * 2)
    inputs = batch_inputs(samples)
    target = torch.stack([s["target"] for s in samples])
    out_p, out_r = patched(**inputs).sample, reference(**inputs).sample
    torch.testing.assert_close(out_p, out_r, atol=0, rtol=0)  # the same code path: bit-identical
    ((out_p - target) ** 2).mean().backward()
    ((out_r - target) ** 2).mean().backward()
    _assert_grads_equal(patched, reference, atol=0)


def _alone(reference, samples):
    """Velocity of each sample run alone through the unpatched model, and the token-weighted MSE sum."""
    outs, err = [], 0.0
    for s in samples:
        out = reference(**batch_inputs([s])).sample[0]
        outs.append(out)
        err = err + ((out - s["target"]) ** 2).sum()
    return outs, err


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_packed_two_resolutions_equals_each_sample_alone(checkpointing):
    patched, reference = patched_and_reference()
    if checkpointing:
        patched.enable_gradient_checkpointing()
    samples = make_samples(patched.config)
    pack = pack_samples(samples)
    out = forward_packed(patched, pack)
    tokens = int(pack["loss_mask"].sum())
    loss = flow_matching_loss(out, pack["target"], pack["loss_mask"], tokens)
    ref_outs, ref_err = _alone(reference, samples)
    ref_loss = ref_err / (tokens * patched.config.in_channels)
    torch.testing.assert_close(out[0], torch.cat(ref_outs), atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    loss.backward()
    ref_loss.backward()
    _assert_grads_equal(patched, reference)


def test_packing_without_cu_seqlens_would_leak_across_samples(monkeypatch):
    """Guard that the test above can fail: one attention segment over the pack differs from alone."""
    patched, reference = patched_and_reference()
    module = modeling.load_patched_module(entry())
    real = module.isp_flash_attn_varlen_func

    def one_segment(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        whole = torch.tensor([0, int(cu_q[-1])], dtype=torch.int32)
        return real(q, k, v, whole, whole, int(cu_q[-1]), int(cu_q[-1]), **kwargs)

    monkeypatch.setattr(module, "isp_flash_attn_varlen_func", one_segment)
    samples = make_samples(patched.config)
    leaky = forward_packed(patched, pack_samples(samples))
    ref_outs, _ = _alone(reference, samples)
    assert (leaky[0] - torch.cat(ref_outs)).abs().max() > 1e-3


def test_packed_inputs_that_do_not_match_the_layout_are_refused():
    patched, _ = patched_and_reference()
    pack = pack_samples(make_samples(patched.config))
    with pytest.raises(ValueError, match="txt_seqlens"):
        forward_packed(patched, {**pack, "txt_seqlens": None})
    with pytest.raises(ValueError, match="text tokens in this rank's slice"):
        forward_packed(patched, {**pack, "txt_seqlens": pack["txt_seqlens"] + torch.tensor([1, -2])})
    with pytest.raises(ValueError, match="one txt_seqlens, timestep, pooled_projections"):
        forward_packed(patched, {**pack, "timestep": pack["timestep"][:1]})


def test_reset_parameters_is_internevo_init():
    patched, _ = patched_and_reference(num_attention_heads=4)  # 32-wide: enough weights for a std estimate
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


def _run_isp(sp: int):
    return run_distributed(isp_worker, sp)[0]


def test_isp_sp2_equals_single_process_packed_and_batched():
    sp = 2
    patched, _ = patched_and_reference()  # also syncs + applies the patch before the workers import it
    results = _run_isp(sp)

    # packed: two resolutions + a padding segment; rank slices cut through sample 0 and interleave text/image
    pack = pack_samples(make_samples(patched.config), multiple=sp)
    assert int(pack["cu_seqlens"][-1]) == 38 and pack["cu_seqlens"].numel() == len(SAMPLES) + 2
    out = forward_packed(patched, pack)
    loss = flow_matching_loss(out, pack["target"], pack["loss_mask"], int(pack["loss_mask"].sum()))
    loss.backward()
    outs, isp_loss, grads = results["packed"]
    torch.testing.assert_close(torch.cat([torch.from_numpy(o) for o in outs], 1), out, atol=ATOL, rtol=0)
    assert abs(isp_loss - loss.item()) < ATOL
    for name, param in patched.named_parameters():
        torch.testing.assert_close(torch.from_numpy(grads[name]), param.grad, atol=ATOL, rtol=0, msg=name)

    # batched (no packing): every row's [text; image] sequence split across ranks, isp_flash_attn_func
    patched.zero_grad()
    batch = batch_inputs(make_samples(patched.config, [BATCH_SHAPE] * 2, seed=1))
    out = patched(**batch).sample
    loss = (out**2).sum() / batch["hidden_states"].numel()
    loss.backward()
    outs, isp_loss, grads = results["batched"]
    torch.testing.assert_close(torch.cat([torch.from_numpy(o) for o in outs], 1), out, atol=ATOL, rtol=0)
    assert abs(isp_loss - loss.item()) < ATOL
    for name, param in patched.named_parameters():
        torch.testing.assert_close(torch.from_numpy(grads[name]), param.grad, atol=ATOL, rtol=0, msg=name)
