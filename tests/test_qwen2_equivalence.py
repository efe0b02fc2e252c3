"""The patched Qwen2 (q/k/v biases, optional sliding window) against independent references: transformers'
unpatched Qwen2ForCausalLM, each document run alone, the single-process run."""

import pytest
import torch

from decoder_cases import DOC_LENGTHS, documents, isp_worker, patched_and_reference
from equivalence_checks import ATOL, assert_no_runtime_equals_unpatched, assert_same_grads, run_alone
from hfpatch import runtime
from runtime_helpers import run_distributed

WINDOW = 4  # smaller than the longest document (19 tokens)
# layer 0 full attention, layer 1 sliding: both mask kinds in one model
SLIDING = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}
CONFIGS = pytest.mark.parametrize("overrides", [{}, SLIDING], ids=["full", "sliding"])


@pytest.fixture(autouse=True)
def _zoo(zoo_copy):
    yield


def test_sliding_config_really_has_a_sliding_layer():
    patched, _ = patched_and_reference("qwen2", **SLIDING)
    assert patched.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in patched.model.layers] == [None, WINDOW]
    assert any(key.endswith("q_proj.bias") and p.abs().max() > 0 for key, p in patched.named_parameters())


@CONFIGS
def test_no_runtime_patched_equals_unpatched_forward_backward_generate(overrides):
    assert_no_runtime_equals_unpatched(*patched_and_reference("qwen2", **overrides))


def _packed_logits(model, row, position_ids=None):
    position_ids = row.position_ids if position_ids is None else position_ids
    with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        return model(input_ids=row.input_ids[None], position_ids=position_ids[None]).logits[0]


@CONFIGS
@pytest.mark.parametrize("positions", ["restart per document", "continue across the pack"])
def test_packed_equals_each_documentrun_alone(overrides, positions):
    patched, reference = patched_and_reference("qwen2", **overrides)
    docs = documents(patched.config.vocab_size)
    row = runtime.build_packed_row(docs)
    position_ids = row.position_ids if positions == "restart per document" else torch.arange(sum(DOC_LENGTHS))
    logits = _packed_logits(patched, row, position_ids)
    loss = runtime.causal_lm_loss(logits, row.labels)
    ref_logits, ref_sum = run_alone(reference, docs)
    n_targets = sum(n - 1 for n in DOC_LENGTHS)
    # transformers builds RoPE tables in float32: shifted positions differ at ~1e-8, leaks at ~1e-2
    atol = ATOL if positions == "restart per document" else 1e-6
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)
    torch.testing.assert_close(loss, ref_sum / n_targets, atol=atol, rtol=0)
    loss.backward()
    (ref_sum / n_targets).backward()
    assert_same_grads(patched, reference, atol)


def test_sliding_window_matters_and_its_size_is_exact():
    """Guards for the sliding test above: dropping the window changes the result, and so does a window one
    token wider or narrower, so the match pins transformers' semantics (keys i - W < j <= i) exactly."""
    patched, _ = patched_and_reference("qwen2", **SLIDING)
    docs = documents(patched.config.vocab_size)
    row = runtime.build_packed_row(docs)
    logits = _packed_logits(patched, row)
    ref_logits, _ = run_alone(patched_and_reference("qwen2", **SLIDING)[1], docs)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    for other in ({}, {**SLIDING, "sliding_window": WINDOW - 1}, {**SLIDING, "sliding_window": WINDOW + 1}):
        _, other_reference = patched_and_reference("qwen2", **other)
        other_logits, _ = run_alone(other_reference, docs)
        assert (logits - other_logits).abs().max() > 1e-3, other


def test_packing_without_cu_seqlens_would_leak_across_documents():
    """Guard that the packed test can fail: one causal segment over the pack differs from alone."""
    patched, reference = patched_and_reference("qwen2")
    docs = documents(patched.config.vocab_size)
    row = runtime.build_packed_row(docs)
    whole = torch.tensor([0, row.input_ids.numel()], dtype=torch.int32)
    with runtime.packed_batch(whole, row.input_ids.numel()):
        leaky = patched(input_ids=row.input_ids[None], position_ids=row.position_ids[None]).logits[0]
    ref_logits, _ = run_alone(reference, docs)
    assert (leaky - ref_logits).abs().max() > 1e-3


def _run_isp(sp: int, overrides: dict):
    return run_distributed(isp_worker, sp, sp, "qwen2", overrides)[0]


@CONFIGS
def test_isp_sp2_equals_single_process(overrides):
    """51 tokens: each of the 2 ranks holds 26 after a one-token padding segment; with the window, a
    document (19 tokens) and the window cross the rank boundary."""
    patched, _ = patched_and_reference("qwen2", **overrides)
    row = runtime.build_packed_row(documents(patched.config.vocab_size))
    loss = runtime.causal_lm_loss(_packed_logits(patched, row), row.labels)
    loss.backward()
    totals, isp_grads = _run_isp(2, overrides)
    assert abs(totals["loss"] - loss.item()) < ATOL
    for name, param in patched.named_parameters():
        torch.testing.assert_close(torch.from_numpy(isp_grads[name]), param.grad, atol=ATOL, rtol=0, msg=name)
