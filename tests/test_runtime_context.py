"""gpc with no runtime, config access, packed-batch publication, setup errors, init."""

import copy
import math

import pytest
import torch

import hfpatch.runtime as rt
from hfpatch.runtime import ParallelMode, gpc
from runtime_helpers import TORCHRUN_ENV


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    rt.destroy()
    yield
    rt.destroy()


def test_no_runtime_answers_as_one_process():
    assert not gpc.is_initialized
    assert gpc.is_initialized() is False
    assert dict(gpc.config.data) == {}
    assert gpc.config.data.get("use_packed_dataset", False) is False
    for mode in ParallelMode:
        assert gpc.get_local_rank(mode) == 0
        assert gpc.get_world_size(mode) == 1
        assert gpc.get_group(mode) is None
        assert gpc.get_ranks_in_group(mode) == [0]
        assert not gpc.is_using_parallel_mode(mode)
    assert gpc.get_global_rank() == 0


def test_config_is_dict_like_with_attributes():
    gpc.config.data.micro_bsz = 2
    assert gpc.config.data["micro_bsz"] == 2
    assert gpc.config["data"].get("micro_bsz") == 2
    gpc.load_config({"parallel": {"tensor": {"size": 2, "mode": "isp"}, "weight": {"size": 4}}})
    assert gpc.config.parallel.tensor.mode == "isp"
    assert gpc.config.parallel["weight"].size == 4
    with pytest.raises(AttributeError, match="config has no key 'nope'"):
        gpc.config.nope


def test_packed_batch_without_torch_distributed():
    assert not torch.distributed.is_initialized()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    rt.set_packed_batch(cu)
    data = gpc.config.data
    assert data.get("use_packed_dataset", False) is True
    assert data["cu_seqlens_data_rank0"] is cu
    assert data["max_seqlen_data_rank0"] == 5
    rt.clear_packed_batch()
    assert dict(data) == {}
    # Setting the keys by hand, as InternEvo users do, also works.
    gpc.config.data["use_packed_dataset"] = True
    with rt.packed_batch([0, 2, 4], 2):
        assert data["cu_seqlens_data_rank0"].dtype == torch.int32
        assert data["max_seqlen_data_rank0"] == 2
    assert dict(data) == {"use_packed_dataset": True}


def test_single_process_initialize_and_destroy():
    with rt.parallel_context(sequence_parallel=1, weight_parallel=1) as ctx:
        assert ctx is gpc and gpc.is_initialized
        assert gpc.is_initialized(ParallelMode.TENSOR)
        assert gpc.get_world_size(ParallelMode.GLOBAL) == 1
        assert gpc.get_group(ParallelMode.TENSOR) is not None
        assert gpc.device_mesh.mesh_dim_names == ("dp", "sp")
        assert gpc.weight_mesh.mesh_dim_names == ("wdp", "wp")
        with pytest.raises(RuntimeError, match="already initialised"):
            rt.initialize()
    assert not gpc.is_initialized
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sequence_parallel": 3}, "world size 4 is not divisible by sequence_parallel=3"),
        ({"weight_parallel": 8}, "world size 4 is not divisible by weight_parallel=8"),
        ({"sequence_parallel": 2, "data_parallel": 4}, "world size 4 does not match data_parallel=4 x sequence_parallel=2 = 8"),
        ({"sequence_parallel": 0}, "sequence_parallel must be a positive int, got 0"),
    ],
)
def test_world_size_must_match_the_config(monkeypatch, kwargs, message):
    # Sizes are checked before any process group is created, so no peers are needed.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError) as info:
        rt.initialize(**kwargs)
    assert message in str(info.value)
    assert not torch.distributed.is_initialized()


def test_weight_parallel_needs_the_runtime():
    with pytest.raises(RuntimeError, match=r"call hfpatch.runtime.initialize\(\) first"):
        rt.apply_weight_parallel(torch.nn.Linear(2, 2))


def test_init_functions_fill_in_place():
    torch.manual_seed(0)
    t = torch.empty(400, 500, dtype=torch.float64)
    assert rt.normal_(std=0.02)(t) is t
    assert abs(t.std().item() - 0.02) < 0.0005 and abs(t.mean().item()) < 0.0005
    rt.scaled_init_method_normal(sigma=0.02, num_layers=8)(t)
    assert abs(t.std().item() - 0.02 / math.sqrt(16)) < 0.0002
    w = torch.nn.Linear(4, 4).weight  # a leaf that requires grad
    rt.normal_(mean=1.0, std=0.0)(w)
    assert torch.equal(w.detach(), torch.ones(4, 4))


def test_one_rank_weight_parallel_keeps_the_gradients_without_dividing_them():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).double()
    sharded = copy.deepcopy(plain)
    x = torch.randn(4, 8, dtype=torch.float64)
    plain(x).square().sum().backward()
    with rt.parallel_context(sequence_parallel=1, weight_parallel=1):
        rt.apply_weight_parallel(sharded, layers=list(sharded))
        with torch.profiler.profile() as prof:
            sharded(x).square().sum().backward()
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
    assert "aten::div" not in {event.key for event in prof.key_averages()}  # FSDP2's divide by a factor of 1
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0)
