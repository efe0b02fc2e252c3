"""The trainer adds Mixtral's router load-balancing loss, over real tokens only, when enabled."""

import pytest
import torch

from conformance import DEFAULT_DOCUMENTS, case, documents
from hfpatch import runtime
from hfpatch.train.step import train_step


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


def _step_loss(model, batch, num_targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: both calls see the same model
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return train_step(model, optimizer, scheduler, [batch], num_targets=num_targets, packed=True,
                      device=torch.device("cpu"), clip_grad_norm=0.0, step=1, rank=0).loss


def test_train_step_adds_the_router_aux_loss_of_the_real_tokens():
    model, reference = case("mixtral").build({"output_router_logits": True, "router_aux_loss_coef": 0.5})
    docs = documents(DEFAULT_DOCUMENTS[0], model.config.vocab_size)
    total = sum(len(d) for d in docs)
    row = runtime.build_packed_row(docs, seq_len=total + 5)  # 5 padding tokens the router must not count
    batch = runtime.shard_for_sequence_parallel(row, 0, 1)
    num_targets = int((row.labels != -100).sum())
    with_aux = _step_loss(model, batch, num_targets)
    model.config.router_aux_loss_coef = 0.0
    without = _step_loss(model, batch, num_targets)
    # independent reference: unpatched transformers over the real tokens alone (no padding); its own
    # packed-position detection keeps the documents apart, as cu_seqlens do in the patched model
    real = reference(input_ids=row.input_ids[None, :total], position_ids=row.position_ids[None, :total],
                     output_router_logits=True, use_cache=False)
    assert with_aux - without == pytest.approx(0.5 * real.aux_loss.item(), abs=1e-6)
    assert abs(with_aux - without) > 1e-3
