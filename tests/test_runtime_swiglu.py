"""runtime.swiglu_mlp against the SwiGLU MLP modules it replaces (float64, eager arithmetic on a CPU)."""

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from hfpatch.train.parallelize import fuse_swiglu_mlp


class SwiGLU(nn.Module):
    """transformers' LlamaMLP (``gate_proj``, ``up_proj``, ``down_proj``) or InternLM2's (``w1``, ``w3``, ``w2``)."""

    def __init__(self, names=("gate_proj", "up_proj", "down_proj"), act="silu", bias=False):
        super().__init__()
        self.names = names
        for name, (fan_in, fan_out) in zip(names, ((24, 56), (24, 56), (56, 24))):
            setattr(self, name, nn.Linear(fan_in, fan_out, bias=bias))
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


def _forward_backward(mlp, x, grad, checkpointed):
    x = x.clone().requires_grad_(True)
    out = checkpoint(mlp, x, use_reentrant=False) if checkpointed else mlp(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_swiglu_mlp_equals_the_module_in_float64(names, checkpointed):
    torch.manual_seed(0)
    plain = SwiGLU(names).double()
    fused = SwiGLU(names).double()
    fused.load_state_dict(plain.state_dict())
    assert fuse_swiglu_mlp(fused)
    x, grad = torch.randn(2, 19, 24, dtype=torch.float64), torch.randn(2, 19, 24, dtype=torch.float64)
    want = _forward_backward(plain, x, grad, checkpointed)
    got = _forward_backward(fused, x, grad, checkpointed)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_swiglu_mlp_runs_backward_once():
    # backward writes the gradients over the saved projections: a second pass would read gradients as activations
    mlp = SwiGLU().double()
    fuse_swiglu_mlp(mlp)
    out = mlp(torch.randn(5, 24, dtype=torch.float64)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs backward once"):
        out.backward()


def test_fuse_swiglu_mlp_takes_only_bias_free_silu_mlps_with_their_own_forward():
    assert not fuse_swiglu_mlp(SwiGLU(act="gelu"))
    assert not fuse_swiglu_mlp(SwiGLU(bias=True))
    tiled = SwiGLU()
    tiled.forward = lambda x: x  # tiling.py wraps the instance's forward: it stays
    assert not fuse_swiglu_mlp(tiled)
    assert fuse_swiglu_mlp(SwiGLU(act="swish"))  # nn.SiLU itself
