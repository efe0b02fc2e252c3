"""Memory levers for long sequences change nothing numerically (float64): activation offload of the
checkpointed layer inputs and the sequence-tiled MLP, alone and together, against the plain model."""

import pytest
import torch

from hfpatch import runtime
from hfpatch.train import parallelize as parallelize_module
from hfpatch.train.offload import ActivationOffload
from hfpatch.train.tiling import tile_mlps
from conformance import DEFAULT_DOCUMENTS, case, documents


def _loss_and_grads(model, row, offload=None):
    model.zero_grad(set_to_none=True)
    context = offload if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with context, runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        logits = model(input_ids=row.input_ids[None], position_ids=row.position_ids[None]).logits
        loss = runtime.causal_lm_loss(logits, row.labels[None])
    loss.backward()  # outside both blocks: the pack is gone, offloaded tensors come back
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference_run():
    model, _ = case("llama2").build({})
    row = runtime.build_packed_row(documents(DEFAULT_DOCUMENTS[0], model.config.vocab_size))
    return model.state_dict(), row, _loss_and_grads(model, row)


@pytest.mark.parametrize("offload,tile", [(True, 0), (False, 4), (True, 4)], ids=["offload", "tiled-mlp", "both"])
def test_levers_under_checkpointing_equal_the_plain_model(reference_run, offload, tile):
    state, row, (want_loss, want_grads) = reference_run
    model, _ = case("llama2").build({})
    model.load_state_dict(state)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tile:
        assert tile_mlps(model, tile) == model.config.num_hidden_layers
    lever = ActivationOffload(min_bytes=1) if offload else None
    loss, grads = _loss_and_grads(model, row, lever)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-12, msg=name)
    if offload:
        # every layer's checkpointed input (tokens x hidden, float64) went through host memory
        layer_input = row.input_ids.numel() * model.config.hidden_size * 8
        assert lever.offloaded_bytes >= model.config.num_hidden_layers * layer_input


def test_offload_keeps_parameters_and_small_tensors_in_place():
    lever = ActivationOffload(min_bytes=1024)
    weight = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.float64))
    small = torch.randn(8, requires_grad=True)
    x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    with lever:
        activation = x * 2  # not a leaf: an activation
        y = (activation @ weight).sum() + (small * small).sum()
    assert lever.offloaded_bytes == 64 * 64 * 8  # the matmul's activation input; not the weight, the leaf x or the small one
    y.backward()
    assert weight.grad is not None and small.grad is not None


def test_tiling_leaves_moe_blocks_alone_and_refuses_empty_tiles():
    from hfpatch import modeling, zoo

    assert tile_mlps(modeling.build_model(zoo.resolve("mixtral")), 4) == 0
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        tile_mlps(modeling.build_model(zoo.resolve("llama2")), 0)


@pytest.mark.parametrize("reshard", [True, False])
def test_parallelize_hands_the_reshard_setting_to_fsdp2(monkeypatch, reshard):
    seen = {}
    monkeypatch.setattr(parallelize_module, "apply_weight_parallel", lambda model, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(parallelize_module.dist, "get_backend", lambda: "nccl")
    parallelize_module.parallelize(torch.nn.Linear(2, 2), world=1, activation_checkpointing=False,
                                   compute_dtype=torch.bfloat16, reshard_after_forward=reshard, weight_copy=False)
    assert seen["reshard_after_forward"] is reshard
