"""Shared test code for the runtime: multi-process launcher, toy model, naive attention."""

from __future__ import annotations

import math
import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from hfpatch.runtime import ParallelMode, gpc, isp_flash_attn_varlen_func

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # 2 shared cores: avoid oversubscription
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        torch.save({"ok": fn(rank, world, *args)}, path)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path)
        raise


def run_distributed(fn, world: int, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes with torchrun's env
    and return their results in rank order. ``fn`` must be importable (module level)."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out_dir)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}{', timed out' if r in hung else ''})")
                continue
            res = torch.load(path, weights_only=False)
            if "error" in res:
                errors.append(f"rank {r}:\n{res['error']}")
            else:
                results.append(res["ok"])
        if errors:
            raise AssertionError("distributed run failed:\n" + "\n".join(errors))
        return results


def naive_attention(q, k, v, keep, scale=None):
    """Textbook attention with an explicit boolean keep-mask, no SDPA.
    q [Lq, H, D], k/v [Lk, Hkv, D], keep [Lq, Lk]."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def keep_mask(lq, lk, causal, left=-1, right=-1):
    """Element-by-element window/causal rule (flash-attn semantics, bottom-right aligned)."""
    keep = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        ii = i + lk - lq
        for j in range(lk):
            ok = True
            if causal and j > ii:
                ok = False
            if not causal and right >= 0 and j > ii + right:
                ok = False
            if left >= 0 and j < ii - left:
                ok = False
            keep[i, j] = ok
    return keep


class ToyBlock(nn.Module):
    """Pre-norm attention + MLP block whose attention is the patched-model call."""

    def __init__(self, hidden, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.norm1 = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, heads * self.head_dim)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        # Exactly what a patched modeling file does:
        rank = gpc.get_local_rank(ParallelMode.DATA)
        cu_seqlens = gpc.config.data[f"cu_seqlens_data_rank{rank}"]
        max_seqlen = gpc.config.data[f"max_seqlen_data_rank{rank}"]
        attn = isp_flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            causal=True, softmax_scale=None, attention_dropout=0.0,
        )
        x = x + self.o(attn.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class ToyLM(nn.Module):
    _no_split_modules = ["ToyBlock"]

    def __init__(self, vocab=32, hidden=16, heads=4, kv_heads=2, layers=2, max_pos=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.layers = nn.ModuleList(ToyBlock(hidden, heads, kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids) + self.pos(position_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def make_toy_model(seed=0):
    torch.manual_seed(seed)
    model = ToyLM().double()
    with torch.no_grad():  # non-trivial norms so their grads are checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def toy_documents(seed=0, lengths=(9, 3, 14, 6, 1, 11, 5), vocab=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
