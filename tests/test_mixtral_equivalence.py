"""What is special to the patched Mixtral (4 experts, top-2): the router load-balancing loss of a pack, against
transformers' own load_balancing_loss_func over the documents alone, and a configured sliding window (the rest,
ISP with the aux loss included, is in the conformance suite)."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import conformance
from conformance import ATOL, FP32_ATOL, assert_same_grads, case
from hfpatch import runtime

COEF = 0.1  # the manifest's [test] router_aux_loss_coef: large enough to show in every loss and gradient


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


def _pack(model):
    """The conformance pack (51 document tokens, a 5-token padding segment) and its real-token mask."""
    pack = case("mixtral").packs(model)[0]
    mask = (torch.arange(pack["input_ids"].shape[-1]) < pack["num_real"]).long()[None]
    return pack, mask


def _packed(model, pack, mask=None, **kwargs):
    with runtime.packed_batch(pack["cu_seqlens"], pack["max_seqlen"]):
        return model(input_ids=pack["input_ids"], position_ids=pack["position_ids"], attention_mask=mask, **kwargs)


def _alone_router_logits(reference, docs):
    """Each document alone through the unpatched model: its router logits per layer, concatenated."""
    outs = [reference(input_ids=torch.tensor([doc]), output_router_logits=True) for doc in docs]
    return tuple(torch.cat([o.router_logits[layer] for o in outs]) for layer in range(len(outs[0].router_logits)))


def test_no_runtime_aux_loss_is_transformers():
    # left padding also exercises transformers' masked aux loss
    patched, reference = case("mixtral").build({})
    ids = torch.randint(1, patched.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out_p, out_r = (m(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True) for m in (patched, reference))
    torch.testing.assert_close(out_p.aux_loss, out_r.aux_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_p.loss, out_r.loss, atol=ATOL, rtol=0)


def test_packed_sliding_window_equals_each_document_alone(monkeypatch):
    """A configured sliding window (4 < the longest document, 19) is kept."""
    conformance.check_packed(case("mixtral"), *case("mixtral").build({"sliding_window": 4}), monkeypatch)


def test_packed_aux_loss_is_transformers_aux_loss_over_the_real_tokens():
    patched, reference = case("mixtral").build({})
    pack, mask = _pack(patched)
    out = _packed(patched, pack, mask, output_router_logits=True)
    expected = load_balancing_loss_func(_alone_router_logits(reference, pack["docs"]), 4, 2)  # real tokens only
    torch.testing.assert_close(out.aux_loss, expected.to(out.aux_loss.dtype), atol=FP32_ATOL, rtol=0)
    # Guard: the pack's 5 padding tokens would shift it, so the mask is what excludes them.
    unmasked = _packed(patched, pack, None, output_router_logits=True).aux_loss
    assert abs(unmasked.item() - expected.item()) > 1e-4


def test_total_loss_includes_the_aux_loss():
    """With labels (transformers' convention: a DataCollatorWithFlattening batch), the packed model's loss is the
    token-mean CE plus router_aux_loss_coef x aux, and its gradients are those of the same total over the
    documents run alone through the unpatched model."""
    adapter = case("mixtral")
    patched, reference = adapter.build({})
    pack, _ = _pack(patched)
    batch = adapter.flattened(patched, pack)
    assert adapter.model_loss(patched, batch).aux_loss is None  # output_router_logits defaults to off
    out = adapter.model_loss(patched, batch, moe_router=True)
    _, ref_ce = adapter.alone(reference, pack)
    ref_aux = load_balancing_loss_func(_alone_router_logits(reference, pack["docs"]), 4, 2)
    expected = ref_ce + COEF * ref_aux
    assert COEF * ref_aux > 1e-2  # far above the tolerance: a missing term would show
    torch.testing.assert_close(out.loss.double(), expected, atol=FP32_ATOL, rtol=0)
    out.loss.backward()
    expected.backward()
    assert_same_grads(patched, reference, FP32_ATOL)
    assert patched.model.layers[0].mlp.gate.weight.grad.abs().max() > 1e-3
