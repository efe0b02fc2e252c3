"""The patched Mamba against independent references: the unpatched model, each document alone,
the single-process run."""

import pytest
import torch
import torch.nn.functional as F

from hfpatch import modeling, runtime, zoo
from mamba_cases import (
    PACKS,
    documents,
    grad_tolerance,
    isp_worker,
    lm_logits,
    patched_and_reference,
    unpacked_batch,
)
from runtime_helpers import run_distributed

ATOL = 1e-10
LEAK = 1e-6  # a leak or a missing hand-off moves the tiny model's logits by more than 1e4 x ATOL


@pytest.fixture(autouse=True)
def _zoo(zoo_copy):
    yield


def _assert_grads_close(model, reference_grads, what=""):
    for name, param in model.named_parameters():
        expected = reference_grads[name]
        torch.testing.assert_close(param.grad, expected, msg=lambda m: f"{what} {name}: {m}",
                                   **grad_tolerance(name, expected))


def test_no_runtime_patched_equals_unpatched_forward_backward_generate():
    patched, reference = patched_and_reference()
    ids = torch.randint(1, patched.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, exercising transformers' own mask path
    out_p = patched(input_ids=ids, attention_mask=mask, labels=ids)
    out_r = reference(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out_p.logits, out_r.logits, atol=0, rtol=0)
    out_p.loss.backward()
    out_r.loss.backward()
    for (name, p), (_, r) in zip(patched.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=0, rtol=0, msg=name)
    patched.eval(), reference.eval()
    gen_p = patched.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    gen_r = reference.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(gen_p, gen_r) and gen_p.shape[1] == 17
    # the cache continues a sequence exactly as running it whole (recurrent and conv state carried)
    with torch.no_grad():
        first = patched(input_ids=ids[:1, :8], use_cache=True)
        step = patched(input_ids=ids[:1, 8:9], cache_params=first.cache_params, use_cache=True)
        whole = patched(input_ids=ids[:1, :9], use_cache=False)
    torch.testing.assert_close(step.logits[0, -1], whole.logits[0, -1], atol=1e-5, rtol=0)


def _alone(reference, docs):
    """float64 logits and summed token losses of each document run alone through the unpatched model."""
    logits, loss_sum = [], 0.0
    for doc in docs:
        ids = torch.tensor([doc])
        out = lm_logits(reference, input_ids=ids)[0]
        logits.append(out)
        loss_sum = loss_sum + F.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
    return torch.cat(logits), loss_sum


@pytest.mark.parametrize("pack", ["spans", "halo"])
def test_packed_equals_each_document_alone(pack):
    patched, reference = patched_and_reference()
    docs = documents(PACKS[pack], patched.config.vocab_size)  # "halo" ends in a padding token
    row = runtime.build_packed_row(docs, seq_len=24)
    with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        logits = lm_logits(patched, input_ids=row.input_ids[None])[0]
        out = patched(input_ids=row.input_ids[None], labels=row.labels[None])  # the model's own (float32) head
    loss = runtime.causal_lm_loss(logits, row.labels)
    n_real = row.num_real_tokens
    ref_logits, ref_sum = _alone(reference, docs)
    n_targets = sum(n - 1 for n in PACKS[pack])
    torch.testing.assert_close(logits[:n_real], ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_sum / n_targets, atol=ATOL, rtol=0)
    # packed labels are already shifted: the model's loss is the same token mean (float32 logits)
    torch.testing.assert_close(out.loss.double(), ref_sum / n_targets, atol=1e-5, rtol=0)
    loss.backward()
    (ref_sum / n_targets).backward()
    _assert_grads_close(patched, {name: r.grad for name, r in reference.named_parameters()})


def test_packing_without_resets_would_leak_across_documents():
    """Guard that the test above can fail: one segment over the pack (no restart) differs from alone."""
    patched, reference = patched_and_reference()
    docs = documents(PACKS["spans"], patched.config.vocab_size)
    row = runtime.build_packed_row(docs)
    whole = torch.tensor([0, row.input_ids.numel()], dtype=torch.int32)
    with runtime.packed_batch(whole, row.input_ids.numel()):
        leaky = lm_logits(patched, input_ids=row.input_ids[None])[0]
    ref_logits, _ = _alone(reference, docs)
    first = PACKS["spans"][0]
    torch.testing.assert_close(leaky[:first], ref_logits[:first], atol=ATOL, rtol=0)  # the first document is alone
    assert (leaky[first:] - ref_logits[first:]).abs().max() > LEAK  # the tests compare at ATOL


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
    patched, _ = patched_and_reference()
    row = runtime.build_packed_row(documents(PACKS["spans"], patched.config.vocab_size))
    patched.eval()  # eval would default to use_cache=True; a pack turns it off
    with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        out = patched(input_ids=row.input_ids[None])
        assert out.cache_params is None
        with pytest.raises(ValueError, match="keeps no cache"):
            patched(input_ids=row.input_ids[None], use_cache=True)


def _run_isp(sp: int):
    return run_distributed(isp_worker, sp)[0]


def test_isp_equals_single_process():
    """sp=2 (gloo) == one process: logits, loss and gradients of each pack (a document spanning the rank
    boundary, one starting 2 tokens before it, one starting exactly on it) and of unpacked rows."""
    patched, reference = patched_and_reference()  # applies the patch before the workers import it
    results = _run_isp(2)
    vocab = patched.config.vocab_size
    for pack, lengths in PACKS.items():
        patched.zero_grad(set_to_none=True)
        row = runtime.build_packed_row(documents(lengths, vocab), seq_len=24)
        with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
            logits = lm_logits(patched, input_ids=row.input_ids[None])
            model_loss = patched(input_ids=row.input_ids[None], labels=row.labels[None]).loss
        loss = runtime.causal_lm_loss(logits, row.labels[None])
        loss.backward()
        isp = results[pack]
        torch.testing.assert_close(torch.from_numpy(isp["logits"]), logits.detach(), atol=ATOL, rtol=0, msg=pack)
        assert abs(isp["loss"] - loss.item()) < ATOL, pack
        assert abs(isp["model_loss"] - model_loss.item()) < 1e-6, pack  # the model's own loss: shares add up
        _assert_grads_close(patched, {name: torch.from_numpy(g) for name, g in isp["grads"].items()}, pack)
    # ISP on plain rows (no cu_seqlens): each row is one sequence split over the ranks; against the unpatched model
    ids, labels = unpacked_batch(vocab)
    logits = lm_logits(reference, input_ids=ids)
    loss = runtime.causal_lm_loss(logits, labels)
    loss.backward()
    isp = results["unpacked"]
    torch.testing.assert_close(torch.from_numpy(isp["logits"]), logits.detach(), atol=ATOL, rtol=0)
    assert abs(isp["loss"] - loss.item()) < ATOL
    _assert_grads_close(reference, {name: torch.from_numpy(g) for name, g in isp["grads"].items()}, "unpacked")


@pytest.mark.parametrize("cut", ["conv window", "recurrent state", "both"])
@pytest.mark.parametrize("pack", ["spans", "halo"])
def test_isp_test_sees_a_missing_hand_off(pack, cut, monkeypatch):
    """Guard for the ISP test: a rank that started its conv window, its state or both afresh (as if a document
    started at the rank boundary, token 12) changes the logits after the boundary, so each hand-off matters."""
    module = modeling.load_patched_module(zoo.resolve("mamba"))
    patched, _ = patched_and_reference()
    row = runtime.build_packed_row(documents(PACKS[pack], patched.config.vocab_size), seq_len=24)
    with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        logits = lm_logits(patched, input_ids=row.input_ids[None])

    def restart_at_boundary(function):
        def cut_at_12(*args, **kwargs):  # token_index and doc_start are the last positional arguments
            token_index, doc_start = args[-2:]
            return function(*args[:-1], torch.where(token_index >= 12, doc_start.clamp(min=12), doc_start), **kwargs)
        return cut_at_12

    for name in {"conv window": ["varlen_causal_conv1d"], "recurrent state": ["varlen_selective_scan"]}.get(
            cut, ["varlen_causal_conv1d", "varlen_selective_scan"]):
        monkeypatch.setattr(module, name, restart_at_boundary(getattr(module, name)))
    with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        no_hand_off = lm_logits(patched, input_ids=row.input_ids[None])
    torch.testing.assert_close(no_hand_off[:, :12], logits[:, :12], atol=ATOL, rtol=0)
    assert (no_hand_off[:, 12:] - logits[:, 12:]).abs().max() > LEAK
