"""One rank in bf16 compute: the weight copy (bf16 weights, float32 masters in the optimizer) trains exactly as
FSDP2's mixed precision does, resumes exactly, and exports the float32 masters."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from hfpatch.train import loop
from hfpatch.train.weight_copy import WeightCopy
from test_train_common import TINY, cli_ok, metrics, train_env  # noqa: F401

RUN = [*TINY, "--steps", "3", "--seed", "7", "--checkpoint-every", "2"]


class TiedModel(torch.nn.Module):
    """An embedding tied to the output head, a float input added to the embeddings."""

    _no_split_modules = ["Linear"]

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.inner = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, shift):
        assert shift.dtype == self.inner.weight.dtype  # cast on the way in, as FSDP2's mixed precision does
        return self.head(self.inner(self.embed(ids) + shift))


def test_tied_weights_share_one_master_and_micro_batches_accumulate_in_float32():
    torch.manual_seed(0)
    model = TiedModel()
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    plain = copy.deepcopy(model).to(torch.bfloat16)
    weights = WeightCopy(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.head.weight is model.embed.weight
    batches = [(torch.randint(0, 16, (2, 5)), torch.randn(2, 5, 8)) for _ in range(2)]
    bf16_grads = []
    for ids, shift in batches:
        model(ids, shift).float().square().mean().backward()
        assert all(p.grad is None for p in model.parameters())  # moved to the masters as soon as accumulated
    with weights.masters_in_model():
        masters = dict(model.named_parameters())
        assert {p.dtype for p in masters.values()} == {torch.float32} and len(masters) == 3  # tied: one
        for name, p in masters.items():
            assert torch.equal(p.detach(), reference[name])
    # the same micro-batches on a plain bf16 model, each gradient taken alone, summed in float32
    for ids, shift in batches:
        plain.zero_grad(set_to_none=True)
        plain(ids, shift.to(torch.bfloat16)).float().square().mean().backward()
        bf16_grads.append({name: p.grad.float() for name, p in plain.named_parameters()})
    for name, master in masters.items():
        torch.testing.assert_close(master.grad, bf16_grads[0][name] + bf16_grads[1][name], rtol=0, atol=0)

    with weights.masters_in_model():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    weights.attach(optimizer)
    optimizer.step()
    for name, p in model.named_parameters():  # the step ends with the masters copied into the model
        torch.testing.assert_close(p, masters[name].detach().to(torch.bfloat16), rtol=0, atol=0)
        assert not torch.equal(masters[name].detach(), reference[name])


@pytest.fixture
def bf16_compute(train_env, monkeypatch):
    """CPU runs take the GPU's default dtype: bf16 compute over float32 weights."""
    monkeypatch.setattr(loop, "compute_dtype", lambda dtype, device: torch.bfloat16 if dtype == "auto" else None)


def _weights(run):
    return load_file(run / "hf" / "model.safetensors")


def test_weight_copy_trains_resumes_and_exports_as_fsdp2(bf16_compute, tmp_path):
    fsdp2 = cli_ok("llama2", *RUN, "--no-weight-copy", "--out", tmp_path / "fsdp2", "--export", tmp_path / "fsdp2" / "hf")
    copied = cli_ok("llama2", *RUN, "--out", tmp_path / "copy", "--export", tmp_path / "copy" / "hf")
    assert "bfloat16 weight copy" in copied.output and "weight copy" not in fsdp2.output
    want, got = metrics(tmp_path / "fsdp2"), metrics(tmp_path / "copy")
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    exported = _weights(tmp_path / "copy")
    assert {t.dtype for t in exported.values()} == {torch.float32}  # the masters, not the bf16 copies
    for name, tensor in _weights(tmp_path / "fsdp2").items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)

    resumed = cli_ok("llama2", *RUN, "--resume", tmp_path / "copy" / "checkpoints" / "step_00000002",
                     "--out", tmp_path / "resumed", "--export", tmp_path / "resumed" / "hf")
    assert "resumed from" in resumed.output
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [got[-1]["loss"]]
    for name, tensor in exported.items():
        torch.testing.assert_close(_weights(tmp_path / "resumed")[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["mixtral", "llava", "flux", "mamba"])  # MoE aux loss, frozen tower, float inputs, scan
def test_weight_copy_trains_every_family_as_fsdp2(bf16_compute, tmp_path, model):
    short = [*TINY, "--steps", "2", "--seed", "7", "--set", "save_checkpoints=false"]
    cli_ok(model, *short, "--no-weight-copy", "--out", tmp_path / "fsdp2")
    assert "bfloat16 weight copy" in cli_ok(model, *short, "--out", tmp_path / "copy").output
    want, got = metrics(tmp_path / "fsdp2"), metrics(tmp_path / "copy")
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]
