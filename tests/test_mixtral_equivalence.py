"""The patched Mixtral (4 experts, top-2) against independent references: transformers' unpatched
MixtralForCausalLM and its own load_balancing_loss_func, each document run alone, the single-process run."""


import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from decoder_cases import DOC_LENGTHS, documents, isp_worker, patched_and_reference, real_token_mask
from equivalence_checks import ATOL, assert_no_runtime_equals_unpatched, assert_same_grads
from hfpatch import runtime
from runtime_helpers import run_distributed

# transformers' cross entropy upcasts logits to float32 only, and its load_balancing_loss_func sums in
# float32: comparisons that go through either use this
ATOL_FP32 = 1e-6
COEF = {"router_aux_loss_coef": 0.1}  # large enough that the aux term shows in every loss and gradient
PACK_LEN = 56  # 51 document tokens + a 5-token padding segment


@pytest.fixture(autouse=True)
def _zoo(zoo_copy):
    yield


def test_no_runtime_patched_equals_unpatched_forward_backward_generate():
    # left padding also exercises transformers' masked aux loss
    out_p, out_r = assert_no_runtime_equals_unpatched(*patched_and_reference("mixtral", **COEF), output_router_logits=True)
    torch.testing.assert_close(out_p.aux_loss, out_r.aux_loss, atol=ATOL, rtol=0)


def _padded_pack(vocab: int):
    row = runtime.build_packed_row(documents(vocab), seq_len=PACK_LEN)
    batch = row.as_batch()
    return row, batch, real_token_mask(batch, row.num_real_tokens)


def _packed(model, batch, mask=None, **kwargs):
    with runtime.packed_batch(batch["cu_seqlens"], batch["max_seqlen"]):
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, **kwargs)


def _alone(reference, docs):
    """Each document alone through the unpatched model: logits, summed token losses, router logits per layer."""
    outs = [reference(input_ids=torch.tensor([doc]), output_router_logits=True) for doc in docs]
    loss_sum = sum(F.cross_entropy(o.logits[0, :-1], torch.tensor(d[1:]), reduction="sum") for o, d in zip(outs, docs))
    router = tuple(torch.cat([o.router_logits[layer] for o in outs]) for layer in range(len(outs[0].router_logits)))
    return torch.cat([o.logits[0] for o in outs]), loss_sum, router


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}], ids=["full", "sliding"])
def test_packed_equals_each_document_alone(overrides):
    """Logits, token-weighted loss and grads of a pack with a padding segment equal the documents alone; a
    configured sliding window (4 < the longest document, 19) is kept."""
    patched, reference = patched_and_reference("mixtral", **COEF, **overrides)
    docs = documents(patched.config.vocab_size)
    row, batch, _ = _padded_pack(patched.config.vocab_size)
    logits = _packed(patched, batch).logits[0]
    loss = runtime.causal_lm_loss(logits, row.labels)
    ref_logits, ref_sum, _ = _alone(reference, docs)
    n_targets = sum(n - 1 for n in DOC_LENGTHS)
    torch.testing.assert_close(logits[: row.num_real_tokens], ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_sum / n_targets, atol=ATOL, rtol=0)
    loss.backward()
    (ref_sum / n_targets).backward()
    assert_same_grads(patched, reference, ATOL)


def test_packed_aux_loss_is_transformers_aux_loss_over_the_real_tokens():
    patched, reference = patched_and_reference("mixtral", **COEF)
    docs = documents(patched.config.vocab_size)
    _, batch, mask = _padded_pack(patched.config.vocab_size)
    out = _packed(patched, batch, mask, output_router_logits=True)
    _, _, router = _alone(reference, docs)
    expected = load_balancing_loss_func(router, 4, 2)  # no mask: the concatenated real tokens only
    torch.testing.assert_close(out.aux_loss, expected.to(out.aux_loss.dtype), atol=ATOL_FP32, rtol=0)
    # Guard: the pack's 5 padding tokens would shift it, so the mask is what excludes them.
    unmasked = _packed(patched, batch, None, output_router_logits=True).aux_loss
    assert abs(unmasked.item() - expected.item()) > 1e-4


def test_total_loss_includes_the_aux_loss():
    """With labels, the packed model's loss is the pack's token-mean CE plus router_aux_loss_coef x aux, and its
    gradients are those of the same total over the documents run alone through the unpatched model."""
    patched, reference = patched_and_reference("mixtral", **COEF)
    docs = documents(patched.config.vocab_size)
    row, batch, mask = _padded_pack(patched.config.vocab_size)
    plain = _packed(patched, batch, mask, labels=batch["labels"])
    assert plain.aux_loss is None  # output_router_logits defaults to off: the CE alone
    out = _packed(patched, batch, mask, labels=batch["labels"], output_router_logits=True)
    _, ref_sum, router = _alone(reference, docs)
    ref_ce = ref_sum / sum(n - 1 for n in DOC_LENGTHS)
    ref_aux = load_balancing_loss_func(router, 4, 2)
    torch.testing.assert_close(plain.loss.double(), ref_ce, atol=ATOL_FP32, rtol=0)
    expected = ref_ce + COEF["router_aux_loss_coef"] * ref_aux
    assert COEF["router_aux_loss_coef"] * ref_aux > 1e-2  # far above the tolerance: a missing term would show
    torch.testing.assert_close(out.loss.double(), expected, atol=ATOL_FP32, rtol=0)
    out.loss.backward()
    expected.backward()
    assert_same_grads(patched, reference, ATOL_FP32)
    assert patched.model.layers[0].mlp.gate.weight.grad.abs().max() > 1e-3


def _run_isp(sp: int, overrides: dict):
    return run_distributed(isp_worker, sp, sp, "mixtral", overrides)[0]


def test_isp_sp2_equals_single_process_with_aux_loss():
    """51 tokens over 2 ranks (26 each after a one-token padding segment that the mask excludes): the ranks'
    aux shares add up to the single-process aux loss of the unpadded pack, and the total loss (runtime CE +
    coef x aux) and its gradients summed over the ranks equal the single process's."""
    patched, _ = patched_and_reference("mixtral", **COEF)
    row = runtime.build_packed_row(documents(patched.config.vocab_size))
    batch = row.as_batch()
    out = _packed(patched, batch, None, labels=batch["labels"], output_router_logits=True)
    loss = runtime.causal_lm_loss(out.logits, batch["labels"]) + COEF["router_aux_loss_coef"] * out.aux_loss
    loss.backward()
    totals, isp_grads = _run_isp(2, COEF)
    assert abs(totals["aux"] - out.aux_loss.item()) < ATOL
    assert abs(totals["loss"] - loss.item()) < ATOL
    assert abs(totals["model_loss"] - out.loss.item()) < ATOL_FP32  # the model's own loss, summed over ranks
    for name, param in patched.named_parameters():
        torch.testing.assert_close(torch.from_numpy(isp_grads[name]), param.grad, atol=ATOL, rtol=0, msg=name)
