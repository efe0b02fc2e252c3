"""What is special to the patched Qwen2: sliding-window layers keep their window, packed and with no runtime
(the full-attention config, ISP with the window included, is in the conformance suite)."""

import pytest
import torch

import conformance
from conformance import ATOL, case

WINDOW = 4  # smaller than the longest document (19 tokens)
# layer 0 full attention, layer 1 sliding: both mask kinds in one model
SLIDING = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


def test_sliding_config_really_has_a_sliding_layer():
    patched, _ = case("qwen2").build(SLIDING)
    assert patched.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in patched.model.layers] == [None, WINDOW]
    assert any(key.endswith("q_proj.bias") and p.abs().max() > 0 for key, p in patched.named_parameters())


def test_no_runtime_sliding_patched_equals_unpatched_forward_backward_generate():
    case("qwen2").check_no_runtime(*case("qwen2").build(SLIDING))


def test_packed_sliding_equals_each_document_alone(monkeypatch):
    conformance.check_packed(case("qwen2"), *case("qwen2").build(SLIDING), monkeypatch)


def test_sliding_window_matters_and_its_size_is_exact():
    """Guards for the sliding test above: dropping the window changes the result, and so does a window one
    token wider or narrower, so the match pins transformers' semantics (keys i - W < j <= i) exactly."""
    adapter = case("qwen2")
    patched, reference = adapter.build(SLIDING)
    pack = adapter.packs(patched)[0]
    logits = adapter.real(adapter.forward(patched, pack), pack)
    torch.testing.assert_close(logits, adapter.alone(reference, pack)[0], atol=ATOL, rtol=0)
    for other in ({}, {**SLIDING, "sliding_window": WINDOW - 1}, {**SLIDING, "sliding_window": WINDOW + 1}):
        _, other_reference = adapter.build(other)
        other_logits, _ = adapter.alone(other_reference, pack)
        assert (logits - other_logits).abs().max() > 1e-3, other
