"""Single process: a packed toy model == each document alone; token-weighted loss."""

import pytest
import torch
import torch.nn.functional as F

import hfpatch.runtime as rt
from runtime_helpers import make_toy_model, toy_documents


def test_packed_model_equals_documents_alone():
    docs = toy_documents()
    row = rt.build_packed_row(docs)
    model = make_toy_model()
    with rt.packed_batch(row.cu_seqlens, row.max_seqlen):
        logits = model(row.input_ids[None], row.position_ids[None])
    loss = rt.causal_lm_loss(logits, row.labels[None])
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    token_sum, count, alone = 0.0, 0, []
    for doc in docs:
        one = rt.build_packed_row([doc])
        with rt.packed_batch(one.cu_seqlens, one.max_seqlen):
            out = model(one.input_ids[None], one.position_ids[None])
        alone.append(out[0])
        token_sum = token_sum + F.cross_entropy(out[0], one.labels, ignore_index=-100, reduction="sum")
        count += int((one.labels != -100).sum())
    (token_sum / count).backward()

    torch.testing.assert_close(logits[0], torch.cat(alone), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, token_sum / count, rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_loss_is_token_weighted_and_safe_without_targets():
    logits = torch.randn(1, 6, 5, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2, 3, -100, -100]])
    expected = F.cross_entropy(logits[0], labels[0], ignore_index=-100)  # mean over 3 targets
    torch.testing.assert_close(rt.causal_lm_loss(logits, labels), expected)
    # A fixed denominator (gradient accumulation over micro-batches).
    torch.testing.assert_close(rt.causal_lm_loss(logits, labels, num_valid_tokens=6), expected * 3 / 6)
    assert rt.causal_lm_loss(logits, torch.full_like(labels, -100)).item() == 0.0
    assert rt.global_loss(rt.causal_lm_loss(logits, labels)) == expected.item()
    assert int(rt.count_valid_tokens(labels)) == 3


def head_case():
    """Hidden states [1, 37, 8], a 50-token head, labels with three ignored, float64; the full-logits loss."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 37, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (1, 37), generator=gen)
    labels[0, [3, 20, 36]] = rt.IGNORE_INDEX
    return hidden, weight, labels, rt.causal_lm_loss(hidden @ weight.t(), labels)


def test_chunked_loss_equals_full_logits_loss():
    hidden, weight, labels, full = head_case()
    expected = torch.autograd.grad(full, (hidden, weight))
    for chunk in (1, 5, 37, 100):  # uneven last chunk, one chunk, chunk larger than the sequence
        loss = rt.chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk)
        grads = torch.autograd.grad(loss, (hidden, weight))
        torch.testing.assert_close(loss, full, rtol=1e-12, atol=0)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    half = rt.chunked_causal_lm_loss(hidden, weight, labels, num_valid_tokens=68)  # 34 valid here
    torch.testing.assert_close(half, full / 2, rtol=1e-12, atol=0)


def test_fused_loss_equals_full_logits_loss():
    hidden, weight, labels, full = head_case()
    expected = torch.autograd.grad(3 * full, (hidden, weight))  # the gradients are scaled by backward's input
    # uneven last chunk, one chunk, larger than the sequence, and the default (logits no larger than the states)
    for chunk, overwrite in [(1, False), (5, True), (37, False), (100, True), (None, False)]:
        states = hidden * 1  # overwritten, it is read no more; autograd keeps no copy of it
        loss = rt.fused_linear_causal_lm_loss(states, weight, labels, chunk_tokens=chunk, overwrite_hidden_states=overwrite)
        grads = torch.autograd.grad(3 * loss, (hidden, weight))
        torch.testing.assert_close(loss, full, rtol=1e-12, atol=0)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    for count in (68, torch.tensor(68)):  # 34 valid here; a count from the ranks arrives as a tensor
        torch.testing.assert_close(rt.fused_linear_causal_lm_loss(hidden, weight, labels, num_valid_tokens=count),
                                   full / 2, rtol=1e-12, atol=0)
    frozen = rt.fused_linear_causal_lm_loss(hidden, weight.detach(), labels)
    torch.testing.assert_close(torch.autograd.grad(3 * frozen, hidden)[0], expected[0], rtol=1e-12, atol=1e-15)
    none = rt.fused_linear_causal_lm_loss(hidden, weight, torch.full_like(labels, rt.IGNORE_INDEX))
    assert none.item() == 0.0 and not torch.autograd.grad(none, hidden)[0].any()


def test_fused_loss_refuses_what_would_be_wrong():
    hidden = torch.randn(1, 6, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, -100, 4, 5]])
    with pytest.raises(ValueError, match="do not line up"):
        rt.fused_linear_causal_lm_loss(hidden, weight, labels[:, :5])
    loss = rt.fused_linear_causal_lm_loss(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs backward once"):  # its gradients were scaled in place
        loss.backward()
    saved = hidden.exp()  # exp keeps its output for backward: overwriting it must not pass silently
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        rt.fused_linear_causal_lm_loss(saved, weight, labels, overwrite_hidden_states=True).backward()


def test_fused_loss_kernel_keeps_wide_and_host_logits_eager():
    # the Triton kernel computes in float32: float64 logits, and any on the host, take the eager arithmetic
    assert rt.fused_loss_kernel(torch.device("cuda"), torch.float64) == "eager"
    assert rt.fused_loss_kernel(torch.device("cpu"), torch.bfloat16) == "eager"
