"""Gradient clipping in the train step: the norm reported is the one before clipping; gradients are scaled to the
limit only when above it."""

import pytest
import torch

from hfpatch.train.step import _clip_grad_norm


def _optimizer_with_grads(*grads: list[float]) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = torch.tensor(grad, dtype=torch.float64)
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize("max_norm, scaled", [(1.0, True), (10.0, False), (0.0, False)])
def test_clipping_scales_the_gradients_only_over_the_limit(max_norm, scaled):
    optimizer = _optimizer_with_grads([3.0, 0.0], [0.0, 4.0])  # norm 5 over both tensors
    params = optimizer.param_groups[0]["params"]
    assert _clip_grad_norm(optimizer, max_norm) == pytest.approx(5.0)
    clipped = torch.cat([p.grad for p in params])
    want = torch.tensor([3.0, 0.0, 0.0, 4.0], dtype=torch.float64) * (max_norm / 5.0 if scaled else 1.0)
    torch.testing.assert_close(clipped, want, rtol=1e-6, atol=0)
