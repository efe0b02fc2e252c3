"""ISP (sp = 2, 4) and FSDP2 weight parallel on gloo processes == one process.

Each world size is launched once (module fixtures); the workers return their local
slices and the tests compare them, reassembled, with a single-process run.
"""

import pytest
import torch
import torch.distributed as dist

import hfpatch.runtime as rt
from hfpatch.runtime import ParallelMode, gpc
from runtime_helpers import make_toy_model, run_distributed, toy_documents

LENGTHS = [7, 1, 12, 4, 9, 2]  # 35 tokens: divisible by neither 2 nor 4
D = 8
ATTN_CASES = {
    # name: heads, kv_heads, causal, window
    "mha_causal": (4, 4, True, (-1, -1)),
    "gqa_noncausal": (8, 4, False, (-1, -1)),
    "gqa_kv_lt_sp": (8, 2, True, (-1, -1)),
    "mqa": (4, 1, True, (-1, -1)),
    "window": (4, 2, True, (3, -1)),
    "mha8_noncausal": (8, 8, False, (-1, -1)),
}
OVERLAP = "2"  # head groups of the overlapped exchange, run as a second pass of every case
DENSE_SHAPE = (2, 8, 4, 2)  # batch, seq, heads, kv_heads


def attn_inputs(heads, kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    n = 40  # enough for any padding; every run slices the same prefix
    make = lambda h: torch.randn(n, h, D, generator=g, dtype=torch.float64)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def dense_inputs():
    b, s, h, hkv = DENSE_SHAPE
    g = torch.Generator().manual_seed(99)
    make = lambda h: torch.randn(b, s, h, D, generator=g, dtype=torch.float64)  # noqa: E731
    return make(h), make(hkv), make(hkv), make(h)


def pack_row():
    offsets = torch.tensor([0] + LENGTHS).cumsum(0).tolist()
    return rt.build_packed_row([list(range(a, a + n)) for a, n in zip(offsets, LENGTHS)])


def _fwd_bwd(fn, tensors, dout):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out * dout).sum().backward()
    return {"out": out.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def isp_attention_worker_part():
    """Run every attention case on this rank's shard; return the local results."""
    sp, rank = gpc.get_world_size(ParallelMode.TENSOR), gpc.get_local_rank(ParallelMode.TENSOR)
    results = {}
    for seed, (name, (heads, kv, causal, window)) in enumerate(ATTN_CASES.items()):
        shard = rt.shard_for_sequence_parallel(pack_row(), rank, sp, pad_id=-1)
        cu, mx = shard["cu_seqlens"], shard["max_seqlen"]
        local = shard["input_ids"].shape[-1]
        sl = slice(rank * local, (rank + 1) * local)
        q, k, v, dout = (t[sl] for t in attn_inputs(heads, kv, seed))
        results[name] = _fwd_bwd(
            lambda q, k, v: rt.isp_flash_attn_varlen_func(
                q[None], k[None], v[None], cu, cu, mx, mx, causal=causal, window_size=window
            )[0],
            (q, k, v), dout,
        )
        results[name]["ids"] = shard["input_ids"][0]
    s_local = DENSE_SHAPE[1] // sp
    q, k, v, dout = (t[:, rank * s_local : (rank + 1) * s_local] for t in dense_inputs())
    results["dense"] = _fwd_bwd(lambda q, k, v: rt.isp_flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    return results


def toy_step(packs, sgd_lr=None):
    """One training step of the toy model on this rank's shard of its DATA rank's pack."""
    sp, sp_rank = gpc.get_world_size(ParallelMode.TENSOR), gpc.get_local_rank(ParallelMode.TENSOR)
    row = packs[gpc.get_local_rank(ParallelMode.DATA)]
    shard = rt.shard_for_sequence_parallel(row, sp_rank, sp)
    model = make_toy_model()
    if sgd_lr is not None:
        rt.apply_weight_parallel(model)
    rt.set_packed_batch(shard["cu_seqlens"], shard["max_seqlen"])
    logits = model(shard["input_ids"], shard["position_ids"])
    loss = rt.causal_lm_loss(logits, shard["labels"])
    loss.backward()
    out = {"loss": rt.global_loss(loss), "layout": gpc.describe()}
    if sgd_lr is None:
        # No FSDP here: sum the per-rank partial gradients by hand.
        grads = {}
        for name, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad
        out["grads"] = grads
    else:
        out["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=sgd_lr).step()
        out["params"] = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        out["sharded_over"] = next(model.parameters()).device_mesh.mesh_dim_names
    rt.clear_packed_batch()
    return out


def two_packs():
    return [rt.build_packed_row(toy_documents(seed=s)) for s in (0, 1)]


def head_errors():
    """Messages for head counts that sp=2 cannot split (raised before any exchange)."""
    cu = torch.tensor([0, 8], dtype=torch.int32)
    messages = []
    for heads, kv in ((3, 3), (6, 3)):
        q, k = torch.randn(1, 4, heads, D), torch.randn(1, 4, kv, D)
        try:
            rt.isp_flash_attn_varlen_func(q, k, k, cu, cu, 8, 8, causal=True)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def overlapped_attention_part():
    """The attention cases again with the exchanges overlapped with compute (heads in groups)."""
    import os

    os.environ[rt.isp.OVERLAP_ENV] = OVERLAP
    try:
        return isp_attention_worker_part()
    finally:
        del os.environ[rt.isp.OVERLAP_ENV]


def worker_world2(rank, world):
    dist.init_process_group("gloo")
    with rt.parallel_context(sequence_parallel=2):
        attention = isp_attention_worker_part()
        overlapped = overlapped_attention_part()
        toy = toy_step([two_packs()[0]])
        errors = head_errors()
    dist.destroy_process_group()
    return {"attention": attention, "overlapped": overlapped, "toy": toy, "errors": errors}


def worker_world4(rank, world):
    dist.init_process_group("gloo")
    with rt.parallel_context(sequence_parallel=4):
        attention = isp_attention_worker_part()
        overlapped = overlapped_attention_part()
    with rt.parallel_context(sequence_parallel=2, weight_parallel=2):  # dp=2, HSDP 2x2
        hsdp = toy_step(two_packs(), sgd_lr=0.1)
    with rt.parallel_context(sequence_parallel=2, weight_parallel=4):  # dp=2, FSDP over 4
        fsdp = toy_step(two_packs(), sgd_lr=0.1)
    dist.destroy_process_group()
    return {"attention": attention, "overlapped": overlapped, "hsdp": hsdp, "fsdp": fsdp}


@pytest.fixture(scope="module")
def world2():
    return run_distributed(worker_world2, 2)


@pytest.fixture(scope="module")
def world4():
    return run_distributed(worker_world4, 4)


# -- single-process references ----------------------------------------------------------


def single_attention(name):
    heads, kv, causal, window = ATTN_CASES[name]
    row = pack_row()
    total, mx = row.input_ids.numel(), row.max_seqlen
    seed = list(ATTN_CASES).index(name)
    q, k, v, dout = (t[:total] for t in attn_inputs(heads, kv, seed))
    return _fwd_bwd(
        lambda q, k, v: rt.varlen_attention(
            q, k, v, row.cu_seqlens, row.cu_seqlens, mx, mx, causal=causal, window_size=window
        ),
        (q, k, v), dout,
    )


def single_toy(packs, sgd_lr=None):
    batch = rt.concat_rows(packs)
    model = make_toy_model()
    with rt.packed_batch(batch["cu_seqlens"], batch["max_seqlen"]):
        logits = model(batch["input_ids"], batch["position_ids"])
    loss = rt.causal_lm_loss(logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = None
    if sgd_lr is not None:
        torch.optim.SGD(model.parameters(), lr=sgd_lr).step()
        params = {n: p.detach() for n, p in model.named_parameters()}
    return loss.item(), grads, params


def assert_attention_matches(results, sp, part="attention"):
    total = pack_row().input_ids.numel()
    for name in ATTN_CASES:
        ref = single_attention(name)
        ids = torch.cat([r[part][name]["ids"] for r in results])
        assert ids[:total].tolist() == list(range(total)) and set(ids[total:].tolist()) <= {-1}
        for key in ("out", "dq", "dk", "dv"):
            got = torch.cat([r[part][name][key] for r in results])[:total]
            torch.testing.assert_close(got, ref[key], rtol=1e-10, atol=1e-10, msg=f"sp={sp} {part} {name} {key}")
    q, k, v, dout = dense_inputs()
    ref = _fwd_bwd(lambda q, k, v: rt.dense_attention(q, k, v, causal=True), (q, k, v), dout)
    for key in ("out", "dq", "dk", "dv"):
        got = torch.cat([r[part]["dense"][key] for r in results], dim=1)
        torch.testing.assert_close(got, ref[key], rtol=1e-10, atol=1e-10, msg=f"sp={sp} {part} dense {key}")


def assert_toy_matches(res, packs, with_params):
    loss, grads, params = single_toy(packs, sgd_lr=0.1 if with_params else None)
    assert res["loss"] == pytest.approx(loss, rel=1e-12)
    assert grads.keys() == res["grads"].keys()
    for name, g in grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(res["grads"][name], g, rtol=1e-9, atol=1e-12, msg=name)
    if with_params:
        for name, p in params.items():
            torch.testing.assert_close(res["params"][name], p, rtol=1e-9, atol=1e-12, msg=name)


# -- tests ---------------------------------------------------------------------------------


def test_isp_sp2_attention_equals_single_process(world2):
    assert_attention_matches(world2, sp=2)


def test_isp_sp4_attention_equals_single_process(world4):
    assert_attention_matches(world4, sp=4)


@pytest.mark.parametrize("sp", [2, 4])
def test_isp_with_exchanges_overlapped_by_head_groups_equals_single_process(world2, world4, sp, monkeypatch):
    monkeypatch.setenv(rt.isp.OVERLAP_ENV, OVERLAP)
    grouped = [name for name, (h, kv, _, _) in ATTN_CASES.items() if rt.isp._overlap_chunks(h, max(kv, sp), sp) > 1]
    assert grouped  # the overlapped path really ran for some cases; the others fell back to one exchange
    assert_attention_matches(world2 if sp == 2 else world4, sp, part="overlapped")


def test_toy_model_sp2_loss_and_grads_equal_single_process(world2):
    for res in world2:
        assert_toy_matches(res["toy"], two_packs()[:1], with_params=False)


def test_heads_not_divisible_by_sp_are_clear_errors(world2):
    assert world2[0]["errors"] == [
        "query heads (3) are not divisible by the sequence parallel size (2)",
        "key/value heads (3) must divide or be a multiple of the sequence parallel size (2)",
    ]


@pytest.mark.parametrize("config", ["hsdp", "fsdp"])
def test_weight_parallel_step_equals_single_process(world4, config):
    for res in world4:
        assert_toy_matches(res[config], two_packs(), with_params=True)
    expected_mesh = ("wdp", "wp") if config == "hsdp" else ("wp",)
    assert world4[0][config]["sharded_over"] == expected_mesh


def test_group_layout(world4):
    hsdp = world4[3]["hsdp"]["layout"]
    assert hsdp["TENSOR"] == {"local_rank": 1, "world_size": 2, "ranks": [2, 3]}
    assert hsdp["DATA"] == {"local_rank": 1, "world_size": 2, "ranks": [1, 3]}
    assert hsdp["WEIGHT"]["ranks"] == [2, 3] and hsdp["WEIGHT_DATA"]["ranks"] == [1, 3]
    assert hsdp["GLOBAL"] == {"local_rank": 3, "world_size": 4, "ranks": [0, 1, 2, 3]}
    fsdp = world4[3]["fsdp"]["layout"]
    assert fsdp["WEIGHT"]["ranks"] == [0, 1, 2, 3] and fsdp["WEIGHT_DATA"]["ranks"] == [3]
    assert fsdp["ZERO1"] == fsdp["WEIGHT_DATA"]
    assert fsdp["PIPELINE"]["world_size"] == 1
