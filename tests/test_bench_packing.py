"""scripts/bench_packing.py's inputs and contenders on the CPU: what its GPU numbers rest on."""

import importlib.util
import sys
import types
from collections import Counter

import pytest
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from test_train_common import REPO, train_env  # noqa: F401  (a private zoo and cache)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_packing", REPO / "scripts" / "bench_packing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_log_normal_step_has_exactly_the_tokens_asked(bench):
    """A step of another length is a new shape: a compiled contender would recompile inside the timed window."""
    for seed in range(40):
        docs = bench.lognormal_documents(16384, 32000, seed)
        assert sum(len(d) for d in docs) == 16384 and all(len(d) <= 4096 for d in docs)


@pytest.fixture
def fake_liger(monkeypatch):
    """liger-kernel's llama entry point as it behaves: it rebinds transformers' llama module globals in place."""
    def apply(rope=True, rms_norm=True, swiglu=True, model=None, **_):
        if rope:
            modeling_llama.apply_rotary_pos_emb = "liger rope"
        if rms_norm:
            modeling_llama.LlamaRMSNorm = "liger rmsnorm"

    package, transformers_part, rope = (types.ModuleType(n) for n in (
        "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.rope"))
    transformers_part.apply_liger_kernel_to_llama = apply
    rope.liger_rotary_pos_emb = "liger rope"
    for module in (package, transformers_part, rope):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm"):  # put back at teardown even if a test fails midway
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))


@pytest.mark.parametrize("contender", ["hf_padfree_liger", "hfpatch_liger"])
def test_a_liger_contender_leaves_the_modules_as_it_found_them(bench, fake_liger, train_env, contender):  # noqa: F811
    """Measured after it, the default `hfpatch` contender once ran liger's RoPE (a graph break in every layer)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    own_rope, own_norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    reference = bench.build("hfpatch_eager", config, _state(config))[0]
    patched = sys.modules[type(reference).__module__]
    patched_rope = patched.apply_rotary_pos_emb
    _, _, context = bench.build(contender, config, _state(config))
    with context:
        assert modeling_llama.LlamaRMSNorm == "liger rmsnorm"
        assert (patched.apply_rotary_pos_emb == "liger rope") == (contender == "hfpatch_liger")
    assert modeling_llama.apply_rotary_pos_emb is own_rope and modeling_llama.LlamaRMSNorm is own_norm
    assert patched.apply_rotary_pos_emb is patched_rope


def _state(config):
    from hfpatch import modeling, zoo

    return modeling.model_class(zoo.resolve("llama2"))(config).state_dict()


def test_a_trainer_run_without_metrics_is_refused_before_measuring(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_packing.py", "--out", str(tmp_path / "out.json"),
                                      "--trainer-run", str(tmp_path / "no_run")])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and not (tmp_path / "out.json").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--trainer-run {tmp_path / 'no_run'} has no metrics.jsonl (give the --out dir of an `hfpatch train` run)")


def test_host_syncs_name_the_ops_each_wait_happened_in(bench):
    """On the CPU there is no CUDA wait to find: an op stands in for one, inside two named ranges."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.ones(4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):  # two steps
            with record_function("outer"), record_function("inner"):
                torch.neg(x)
            torch.neg(x)
    sites = {s["site"]: s["calls_per_step"] for s in bench.host_syncs(prof, steps=2, calls=("aten::neg",))}
    assert sites == {"aten::neg < inner < outer": 1.0, "aten::neg": 1.0}


def test_idle_gaps_add_up_the_idle_time_and_name_the_work_around_long_gaps(bench):
    """Two steps of a made-up timeline (microseconds): back-to-back kernels, one overlap, one long gap a step."""
    step = [("embed", 0, 100), ("gemm", 105, 500), ("copy", 400, 450), ("norm", 510, 600), ("loss", 1600, 1700)]
    spans = step + [(name, start + 2000, end + 2000) for name, start, end in step]
    idle = bench.idle_gaps(spans, steps=2, min_us=20)
    # per step: 5 us + 10 us short gaps; 1000 us norm -> loss; 300 us between the steps (loss -> embed), once
    assert idle["in_gaps_under_20us_ms_per_step"] == pytest.approx(0.015)
    assert idle["idle_ms_per_step"] == pytest.approx(0.015 + 1.0 + 0.15)
    assert idle["longest_sites"] == [
        {"site": "norm -> loss", "gaps_per_step": 1.0, "ms_per_step": pytest.approx(1.0)},
        {"site": "loss -> embed", "gaps_per_step": 0.5, "ms_per_step": pytest.approx(0.15)},
    ]


def test_live_at_peak_groups_the_blocks_held_at_the_peak_by_the_code_that_allocated_them(bench):
    """A made-up allocator trace: the peak is reached before the activation is freed; a block freed before the peak
    and one whose free has not completed by then are told apart; torch's own frames are skipped."""
    def alloc(addr, mib, *files):
        return {"action": "alloc", "addr": addr, "size": mib * 2**20,
                "frames": [{"filename": f, "line": 7, "name": "fn"} for f in files]}

    def free(addr, action="free_completed"):
        return {"action": action, "addr": addr, "size": 0}

    model, torch_op = "/x/modeling_llama.py", "/site-packages/torch/nn/functional.py"
    trace = [alloc(1, 100, torch_op, model), alloc(2, 50, "/tmp/torchinductor_u/ab/cab.py"), free(2),
             alloc(3, 300, model), free(1, "free_requested"), alloc(4, 40, torch_op), free(3), alloc(5, 10, model)]
    peak = bench.live_at_peak(trace)
    assert peak["peak_in_step_gib"] * 1024 == 440
    assert peak["live_at_peak"] == [
        {"site": "modeling_llama.py:7 fn", "blocks": 2, "gib": 400 / 1024, "largest_mib": [300.0, 100.0]},
        {"site": "torch: fn", "blocks": 1, "gib": 40 / 1024, "largest_mib": [40.0]},
    ]


def test_the_gemm_only_contender_runs_each_projections_three_matmuls_and_nothing_else(bench):
    """Its time is the floor of a step: the forward and both backward GEMMs of 7 projections a layer and the head."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model, step, _ = bench.build("gemm_only", config, state=None)
    batch = bench.make_batch([torch.arange(3, 40), torch.arange(3, 20)], pin=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, batch)
    ops = Counter(e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    assert ops["aten::matmul"] + ops["aten::mm"] == 3 * (7 * 2 + 1)
    shapes = sorted({tuple(w.shape) for w in model.parameters()})
    assert shapes == [(32, 32), (32, 48), (48, 32), (64, 32)] and batch.tokens == 54 and batch.n_targets == 52


def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_packing.py", "--out", str(tmp_path / "out.json")])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and not (tmp_path / "out.json").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("no CUDA GPU here: every contender runs on one "
                                                                     "(this script measures GPU steps)")
