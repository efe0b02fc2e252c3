"""What is special to the patched Mamba: the varlen conv and scan pieces against upstream's own functions, the
parallel scan against the recurrence, the cache, and guards that each ISP hand-off matters (the conformance suite
has the rest, ISP included)."""

import pytest
import torch

from conformance import ATOL, LEAK, case
from hfpatch import modeling, runtime, zoo


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


def test_cache_continues_a_sequence_as_running_it_whole():
    """The recurrent and conv state carried by the cache (runtime off)."""
    patched, _ = case("mamba").build({})
    ids = torch.randint(1, patched.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = patched(input_ids=ids[:, :8], use_cache=True)
        step = patched(input_ids=ids[:, 8:9], cache_params=first.cache_params, use_cache=True)
        whole = patched(input_ids=ids, use_cache=False)
    torch.testing.assert_close(step.logits[0, -1], whole.logits[0, -1], atol=1e-5, rtol=0)


def test_conv_and_state_each_restart_at_document_starts():
    """The two varlen pieces against upstream's own functions run per document, and each one's guard."""
    module = modeling.load_patched_module(zoo.resolve("mamba"))
    lengths = [3, 6, 1, 5]  # a 1-token document: shorter than the conv window
    bounds = torch.tensor([0, 3, 9, 10, 15])
    total, channels, state = 15, 6, 4
    token_index = torch.arange(total)
    doc_start = bounds[torch.searchsorted(bounds, token_index, right=True) - 1]
    no_resets = torch.zeros_like(token_index)
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, weight, bias = randn(1, channels, total), randn(channels, 4), randn(channels)
    conv = module.varlen_causal_conv1d(x, weight, bias, token_index, doc_start, activation="silu")
    alone = torch.cat([module.causal_conv1d_fn(part, weight, bias, activation="silu")
                       for part in x.split(lengths, dim=-1)], dim=-1)
    torch.testing.assert_close(conv, alone, atol=ATOL, rtol=0)
    leaky = module.varlen_causal_conv1d(x, weight, bias, token_index, no_resets, activation="silu")
    assert (leaky - alone).abs().max() > 1e-2

    dt, B, C, z = randn(1, channels, total), randn(1, state, total), randn(1, state, total), randn(1, channels, total)
    A = -torch.rand(channels, state, generator=g, dtype=torch.float64) * 0.5  # slow decay: a leak shows
    D = randn(channels)
    scan = module.varlen_selective_scan(x, dt, A, B, C, token_index, doc_start, D=D, z=z, delta_softplus=True)
    alone = torch.cat([
        module.mamba_selective_scan(xs, dts, A, bs, cs, D=D, z=zs, delta_softplus=True, use_associative_scan=False)
        for xs, dts, bs, cs, zs in zip(*(t.split(lengths, dim=-1) for t in (x, dt, B, C, z)))
    ], dim=-1)
    torch.testing.assert_close(scan, alone, atol=ATOL, rtol=0)
    leaky = module.varlen_selective_scan(x, dt, A, B, C, token_index, no_resets, D=D, z=z, delta_softplus=True)
    assert (leaky - alone).abs().max() > 1e-2


@pytest.mark.parametrize("length", [1, 7, 8, 9, 30])
def test_parallel_scan_equals_the_token_by_token_recurrence(length):
    """`scan_linear_recurrence` against a plain loop, with chunks of 8: inside one chunk, exactly chunk-sized,
    one token over, several chunks and a partial one; decays of 0 (document starts) included."""
    module = modeling.load_patched_module(zoo.resolve("mamba"))
    g = torch.Generator().manual_seed(length)
    a = torch.rand(2, 3, length, 4, generator=g, dtype=torch.float64)
    a[:, :, torch.rand(length, generator=g) < 0.2] = 0.0
    b = torch.randn(2, 3, length, 4, generator=g, dtype=torch.float64)
    decay, states = module.scan_linear_recurrence(a, b, chunk=8)
    h, prod = torch.zeros(2, 3, 4, dtype=torch.float64), torch.ones(2, 3, 4, dtype=torch.float64)
    for t in range(length):
        h, prod = a[:, :, t] * h + b[:, :, t], prod * a[:, :, t]
        torch.testing.assert_close(states[:, :, t], h, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(decay[:, :, t], prod, atol=1e-12, rtol=1e-12)


def test_packed_forward_keeps_no_cache():
    patched, _ = case("mamba").build({})
    pack = case("mamba").packs(patched)[0]
    patched.eval()  # eval would default to use_cache=True; a pack turns it off
    with runtime.packed_batch(pack["cu_seqlens"], pack["max_seqlen"]):
        out = patched(input_ids=pack["input_ids"])
        assert out.cache_params is None
        with pytest.raises(ValueError, match="keeps no cache"):
            patched(input_ids=pack["input_ids"], use_cache=True)


@pytest.mark.parametrize("cut", ["conv window", "recurrent state", "both"])
@pytest.mark.parametrize("pack_index", [0, 1], ids=["spans", "halo"])
def test_isp_test_sees_a_missing_hand_off(pack_index, cut, monkeypatch):
    """Guard for the conformance ISP run (sp=2 splits the manifest's 24-token packs at token 12): a rank that
    started its conv window, its state or both afresh (as if a document started at the rank boundary) changes
    the logits after the boundary, so each hand-off matters."""
    module = modeling.load_patched_module(zoo.resolve("mamba"))
    adapter = case("mamba")
    patched, _ = adapter.build({})
    pack = adapter.packs(patched)[pack_index]
    assert pack["input_ids"].shape[-1] == 24
    with torch.no_grad():
        logits = adapter.forward(patched, pack)

    def restart_at_boundary(function):
        def cut_at_12(*args, **kwargs):  # token_index and doc_start are the last positional arguments
            token_index, doc_start = args[-2:]
            return function(*args[:-1], torch.where(token_index >= 12, doc_start.clamp(min=12), doc_start), **kwargs)
        return cut_at_12

    for name in {"conv window": ["varlen_causal_conv1d"], "recurrent state": ["varlen_selective_scan"]}.get(
            cut, ["varlen_causal_conv1d", "varlen_selective_scan"]):
        monkeypatch.setattr(module, name, restart_at_boundary(getattr(module, name)))
    with torch.no_grad():
        no_hand_off = adapter.forward(patched, pack)
    torch.testing.assert_close(no_hand_off[:12], logits[:12], atol=ATOL, rtol=0)
    assert (no_hand_off[12:] - logits[12:]).abs().max() > LEAK
