"""Checks shared by the decoder equivalence tests: patched vs unpatched, packed vs documents alone."""

import torch
import torch.nn.functional as F

ATOL = 1e-10


def assert_same_grads(model, reference, atol: float = ATOL) -> None:
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=atol, rtol=0, msg=name)


def assert_no_runtime_equals_unpatched(patched, reference, **forward_kwargs):
    """Left-padded batch (transformers' own mask path): logits, loss, grads, then greedy generate()
    with a KV cache. Returns both outputs for model-specific checks."""
    ids = torch.randint(1, patched.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out_p = patched(input_ids=ids, attention_mask=mask, labels=ids, **forward_kwargs)
    out_r = reference(input_ids=ids, attention_mask=mask, labels=ids, **forward_kwargs)
    torch.testing.assert_close(out_p.logits, out_r.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_p.loss, out_r.loss, atol=ATOL, rtol=0)
    out_p.loss.backward()
    out_r.loss.backward()
    assert_same_grads(patched, reference)
    gen_p = patched.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    gen_r = reference.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(gen_p, gen_r) and gen_p.shape[1] == 17
    return out_p, out_r


def run_alone(reference, docs):
    """Each document alone through the unpatched model: concatenated logits and summed token losses."""
    logits, loss_sum = [], 0.0
    for doc in docs:
        ids = torch.tensor([doc])
        out = reference(input_ids=ids).logits[0]
        logits.append(out)
        loss_sum = loss_sum + F.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
    return torch.cat(logits), loss_sum
