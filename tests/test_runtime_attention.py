"""Reference varlen attention == each document alone == dense block-diagonal attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from hfpatch import runtime
from hfpatch.runtime import (
    AttentionBackendError,
    dense_attention,
    isp_flash_attn_func,
    isp_flash_attn_varlen_func,
    resolve_backend,
    validate_cu_seqlens,
    varlen_attention,
)
from runtime_helpers import keep_mask, naive_attention

LENGTHS = [7, 1, 12, 4, 9, 3]  # >= 5 documents, one of length 1
D = 8


def make_pack(heads, kv_heads, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, kv_heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, kv_heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(total, heads, D, generator=g, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, dout, cu


def fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    (out * dout).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def per_document(q, k, v, cu, causal, window):
    """Each document alone: plain SDPA when possible, else naive masked attention."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        qd, kd, vd = q[a:b], k[a:b], v[a:b]
        if window == (-1, -1):
            rep = q.shape[1] // k.shape[1]
            o = F.scaled_dot_product_attention(
                qd.transpose(0, 1), kd.repeat_interleave(rep, 1).transpose(0, 1),
                vd.repeat_interleave(rep, 1).transpose(0, 1), is_causal=causal,
            ).transpose(0, 1)
        else:
            o = naive_attention(qd, kd, vd, keep_mask(b - a, b - a, causal, *window))
        outs.append(o)
    return torch.cat(outs)


def block_diagonal(q, k, v, cu, causal, window):
    """The whole pack at once with a dense document mask."""
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu.long()))
    pos = torch.cat([torch.arange(n) for n in torch.diff(cu.long()).tolist()])
    keep = doc[:, None] == doc[None, :]
    if causal:
        keep &= pos[None, :] <= pos[:, None]
    left, right = window
    if left >= 0:
        keep &= pos[None, :] >= pos[:, None] - left
    if right >= 0 and not causal:
        keep &= pos[None, :] <= pos[:, None] + right
    return naive_attention(q, k, v, keep)


CASES = [
    # heads, kv_heads, causal, window
    (4, 4, True, (-1, -1)),
    (4, 4, False, (-1, -1)),
    (6, 2, True, (-1, -1)),  # GQA
    (4, 1, False, (-1, -1)),  # MQA
    (4, 2, True, (3, -1)),  # causal sliding window
    (4, 4, False, (2, 1)),  # two-sided window
]


@pytest.mark.parametrize("heads,kv_heads,causal,window", CASES)
def test_reference_matches_documents_alone_and_block_diagonal(heads, kv_heads, causal, window):
    q, k, v, dout, cu = make_pack(heads, kv_heads)
    max_len = max(LENGTHS)
    got = fwd_bwd(
        lambda q, k, v: varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal, window_size=window, backend="reference"),
        q, k, v, dout,
    )
    alone = fwd_bwd(lambda q, k, v: per_document(q, k, v, cu, causal, window), q, k, v, dout)
    dense = fwd_bwd(lambda q, k, v: block_diagonal(q, k, v, cu, causal, window), q, k, v, dout)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, alone, dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} vs documents alone")
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=f"{name} vs block diagonal")


def test_softmax_scale_and_patched_call_signature():
    q, k, v, _, cu = make_pack(4, 2)
    scale = 0.37
    out = isp_flash_attn_varlen_func(
        q[None], k[None], v[None], cu, cu, 12, 12, causal=True, softmax_scale=scale, attention_dropout=0.0
    )
    assert out.shape == (1, q.shape[0], 4, D)
    ref = block_diagonal(q * scale * math.sqrt(D), k, v, cu, True, (-1, -1))
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)


def test_dense_attention_matches_naive():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 10, 4, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, 10, 2, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, 10, 2, D, generator=g, dtype=torch.float64)
    for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (2, -1))):
        out = isp_flash_attn_func(q, k, v, causal=causal, window_size=window)
        for b in range(2):
            ref = naive_attention(q[b], k[b], v[b], keep_mask(10, 10, causal, *window))
            torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-10)
    assert dense_attention(q, k, v, causal=True).shape == q.shape


def test_low_precision_reference_runs():
    q, k, v, dout, cu = make_pack(4, 2)
    out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cu, 12, 12, causal=True)
    ref = block_diagonal(q, k, v, cu, True, (-1, -1))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0.05, atol=0.05)


# -- validation and backend errors ------------------------------------------------------


def _call(cu, total=36, max_len=24, **kw):
    q = torch.randn(total, 4, D)
    return varlen_attention(q, q, q, cu, cu, max_len, max_len, causal=True, **kw)


@pytest.mark.parametrize(
    "cu,exc,message",
    [
        (torch.tensor([0, 12, 36], dtype=torch.int64), TypeError, "must have dtype torch.int32, got torch.int64"),
        ([0, 12, 36], TypeError, "must be a torch.Tensor"),
        (torch.tensor([[0, 12, 36]], dtype=torch.int32), ValueError, "must be 1-D"),
        (torch.tensor([1, 12, 36], dtype=torch.int32), ValueError, "must start at 0"),
        (torch.tensor([0, 20, 12, 36], dtype=torch.int32), ValueError, "must be non-decreasing"),
        (torch.tensor([0, 12, 30], dtype=torch.int32), ValueError, "ends at 30 but the pack has 36 tokens"),
        (torch.tensor([0, 30, 36], dtype=torch.int32), ValueError,
         "max_seqlen=24 for cu_seqlens_q is smaller than its longest segment (30)"),
    ],
)
def test_cu_seqlens_errors(cu, exc, message):
    with pytest.raises(exc) as info:
        _call(cu)
    assert message in str(info.value)


def test_validation_is_cached_but_sees_in_place_edits():
    cu = torch.tensor([0, 12, 36], dtype=torch.int32)
    assert validate_cu_seqlens(cu, 36) == [0, 12, 36]
    cu[1] = 40  # bumps the tensor version: checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        validate_cu_seqlens(cu, 36)


def test_a_pack_moved_from_the_host_is_checked_without_reading_the_device_copy_back():
    # a meta tensor has no values to read: checking it must use the host's copy (on a GPU: no sync)
    with runtime.packed_batch(torch.tensor([0, 12, 36], dtype=torch.int32), device="meta"):
        on_device = runtime.gpc.config.data["cu_seqlens_data_rank0"]
        assert on_device.device.type == "meta"
        assert runtime.gpc.config.data["max_seqlen_data_rank0"] == 24
        assert validate_cu_seqlens(on_device, 36, 24) == [0, 12, 36]
        with pytest.raises(ValueError, match="ends at 36 but the pack has 30 tokens"):
            validate_cu_seqlens(on_device, 30)
        on_device.add_(0)  # changed in place: the host's copy no longer describes it
        with pytest.raises(NotImplementedError):
            validate_cu_seqlens(on_device, 36)


def test_head_errors():
    cu = torch.tensor([0, 6], dtype=torch.int32)
    q = torch.randn(6, 6, D)
    k = torch.randn(6, 4, D)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of key/value heads \(4\)"):
        varlen_attention(q, k, k, cu, cu, 6, 6)


def test_unavailable_backends_name_what_is_missing(monkeypatch):
    q = torch.randn(6, 2, D)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        wanted = r"'flash_attn' was requested \(argument\) but cannot run: flash-attn 2 is not importable"
        with pytest.raises(AttentionBackendError, match=wanted):
            resolve_backend("flash_attn", q)
        monkeypatch.setenv("HFPATCH_ATTN_BACKEND", "fa4")
        with pytest.raises(AttentionBackendError, match=r"'fa4' was requested \(HFPATCH_ATTN_BACKEND\).*flash_attn.cute"):
            resolve_backend(None, q)
        monkeypatch.delenv("HFPATCH_ATTN_BACKEND")
    # torch varlen exists on torch >= 2.10 but needs CUDA half tensors.
    wanted = r"'torch_varlen'.*(needs CUDA tensors in float16/bfloat16, got cpu torch.float32|varlen_attn)"
    with pytest.raises(AttentionBackendError, match=wanted):
        _call(torch.tensor([0, 12, 36], dtype=torch.int32), backend="torch_varlen")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_backend("nope", q)
    assert resolve_backend(None, q) == "reference"  # CPU auto
    monkeypatch.setenv("HFPATCH_ATTN_BACKEND", "reference")
    assert resolve_backend(None, q) == "reference"


def test_internevo_style_batch_is_read_as_one_pack():
    q, k, v, _, cu = make_pack(4, 2)
    total = q.shape[0]  # 36 tokens as 2 rows of 18; segments cross the row edge
    rows = lambda t: t.detach().reshape(2, total // 2, *t.shape[1:])  # noqa: E731
    out = isp_flash_attn_varlen_func(rows(q), rows(k), rows(v), cu, cu, 12, 12, causal=True)
    assert out.shape == (2, total // 2, 4, D)
    ref = block_diagonal(q, k, v, cu, True, (-1, -1))
    torch.testing.assert_close(out.reshape(total, 4, D), ref.detach(), rtol=1e-10, atol=1e-10)
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        isp_flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, return_attn_probs=True)


def _importable(monkeypatch, *names):
    """Pretend exactly ``names`` of the kernel packages import here (auto's cache cleared around it)."""
    from hfpatch.runtime import attention

    real = attention._load

    def fake(name):
        if name in names:
            return (lambda *a, **k: None), None, None
        return real(name) if name == "reference" else (None, None, "ImportError: not installed")

    monkeypatch.setattr(attention, "_load", fake)
    attention.auto_backend.cache_clear()
    return attention


@pytest.mark.parametrize("capability,head_dim,dropout,importable,want", [
    ((9, 0), 128, False, ("fa4", "flash_attn", "torch_varlen"), "fa4"),        # Hopper: FA4 first
    ((10, 0), 128, False, ("fa4", "torch_varlen"), "fa4"),                     # Blackwell
    ((8, 0), 128, False, ("fa4", "flash_attn", "torch_varlen"), "flash_attn"),  # Ampere: not FA4's arch
    ((9, 0), 128, False, ("torch_varlen",), "torch_varlen"),                  # FA4 not installed
    ((9, 0), 128, True, ("fa4", "torch_varlen"), "reference"),                # dropout: neither has it
    ((9, 0), 128, True, ("fa4", "flash_attn"), "flash_attn"),                 # flash-attn 2 has dropout
    ((10, 0), 256, False, ("fa4", "torch_varlen"), "torch_varlen"),           # FA4 on sm100: head dim <= 128
    ((9, 0), 100, False, ("fa4", "flash_attn"), "flash_attn"),                # FA4: head dim a multiple of 8
])
def test_auto_takes_the_first_kernel_that_can_run_the_call(monkeypatch, caplog, capability, head_dim, dropout, importable, want):
    attention = _importable(monkeypatch, *importable)
    call = attention.AttentionCall("cuda", capability, torch.bfloat16, head_dim, dropout, (-1, 0))
    try:
        with caplog.at_level("INFO", logger="hfpatch.runtime.attention"):
            assert attention.auto_backend(call) == want
            attention.auto_backend(call)  # cached: the reasons are logged once
        skipped = attention.AUTO_ORDER[: attention.AUTO_ORDER.index(want)] if want != "reference" else attention.AUTO_ORDER
        assert [r.getMessage().split()[1] for r in caplog.records] == list(skipped)
    finally:
        attention.auto_backend.cache_clear()
    # float32 runs on no kernel
    assert attention._call_problem("fa4", attention.AttentionCall("cuda", capability, torch.float32, head_dim)) is not None


def test_env_command_names_the_backend_and_why_the_others_were_passed_over():
    from click.testing import CliRunner

    from hfpatch.cli import main

    result = CliRunner().invoke(main, ["env", "--head-dim", "64"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = [line.split(None, 1) for line in lines if line.startswith("  ")]
    assert [name for name, _ in table] == ["fa4", "flash_attn", "torch_varlen", "reference"]
    assert dict(table)["reference"] == "runs here (auto picks it)"  # no GPU here
    assert "not importable" in dict(table)["fa4"] or "CUDA" in dict(table)["fa4"]
    assert "fused linear cross-entropy: eager" in result.output
    assert "SwiGLU MLP (compiled layers): eager" in result.output


@pytest.mark.parametrize("heads, kv_heads, causal, window", [(4, 4, True, (-1, -1)), (4, 2, False, (-1, -1)),
                                                             (4, 1, True, (3, -1)), (4, 2, False, (2, 1))])
def test_packed_attention_op_traced_equals_eager(heads, kv_heads, causal, window):
    """Under torch.compile one rank's call runs through torch.ops.hfpatch.packed_attention (no graph break); its
    registered backward (the reference's in closed form) gives the eager path's gradients."""
    from hfpatch.runtime.attention_op import packed_attention

    q, k, v, dout, cu = make_pack(heads, kv_heads)
    lengths = torch.tensor(LENGTHS)

    def attend(q, k, v):
        return isp_flash_attn_varlen_func(q.sin(), k, v, cu, cu, int(lengths.max()), int(lengths.max()), causal=causal,
                                          window_size=window).cos()

    torch._dynamo.reset()
    try:
        traced = fwd_bwd(torch.compile(attend, fullgraph=True, backend="aot_eager"), q, k, v, dout)
    finally:
        torch._dynamo.reset()
    for got, want in zip(traced, fwd_bwd(attend, q, k, v, dout)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    scale = 1 / math.sqrt(D)
    args = (q, k, v, cu, cu, causal, scale, *runtime.attention._window(window, causal), "reference")
    torch.library.opcheck(packed_attention, args)  # fake shapes, autograd registration, tracing
