"""The trainer's numerics: packed == padded, ISP sp=2 == sp=1, FSDP2 + dp == single process.

Float64 parameters on CPU make the comparisons tight; the reported loss is float32
(the runtime's loss accumulates in float32), the grad norm float64.
"""

import pytest
import torch
from safetensors.torch import load_file

from conformance import case
from test_train_common import TINY, cli_ok, metrics, module, torchrun, train_env  # noqa: F401

COMMON = [*TINY, "--steps", "3", "--dtype", "float64", "--seed", "7"]


@pytest.fixture(scope="module")
def reference(train_env, tmp_path_factory):
    """One process, packed, sp=1: the curve every other layout must reproduce."""
    run = tmp_path_factory.mktemp("reference")
    cli_ok("llama2", *COMMON, "--out", run, "--export", run / "hf")
    return run


def assert_same_curve(run, reference, rel=1e-6):
    got, want = metrics(run), metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=rel)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-9)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]


def assert_same_weights(export, reference_export):
    got, want = load_file(export / "model.safetensors"), load_file(reference_export / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)


def test_packed_run_equals_the_same_documents_padded(reference, tmp_path):
    cli_ok("llama2", *COMMON, "--padded", "--out", tmp_path)
    assert_same_curve(tmp_path, reference)
    assert metrics(tmp_path)[0]["loss"] != metrics(tmp_path)[1]["loss"]  # really training


def test_activation_checkpointing_changes_nothing(reference, tmp_path):
    cli_ok("llama2", *COMMON, "--activation-checkpointing", "--out", tmp_path)
    assert_same_curve(tmp_path, reference)


def _layer_calls(model) -> list[int]:
    """Per decoder layer: a counter of its children's forward calls (recomputation calls them again)."""
    from hfpatch.runtime import find_decoder_layers

    counts = []
    for i, layer in enumerate(find_decoder_layers(model)):
        counts.append(0)
        for child in layer.children():
            child.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("name, fraction, recomputed", [
    ("llama2", 0.75, [True, False]),  # int(0.75 x 2 layers) = 1: the first layer only, as InternEvo
    ("llama2", 1.0, [True, True]),  # transformers' own switch
    ("flux", True, [True, True]),  # no transformers switch (diffusers): each block (1 double, 1 single) wrapped
])
def test_checkpointed_layers_recompute_and_leave_the_grads_unchanged(train_env, name, fraction, recomputed):
    from hfpatch.train.parallelize import checkpoint_layers

    if name == "flux":
        adapter = case("flux")
        model, reference = adapter.build({})
        inputs = adapter.batch_inputs(adapter.samples(model.config, [adapter.ROW_SHAPE] * 2))
        loss_of = lambda m: (m(**inputs).sample ** 2).mean()  # noqa: E731
    else:
        model, reference = case(name).build({})
        ids = torch.randint(1, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        loss_of = lambda m: m(input_ids=ids, labels=ids).loss  # noqa: E731
    model.train(), reference.train()
    assert checkpoint_layers(model, float(fraction)) == sum(recomputed)
    calls, plain_calls = _layer_calls(model), _layer_calls(reference)
    loss_of(model).backward()
    loss_of(reference).backward()
    assert [c == 2 * p for c, p in zip(calls, plain_calls)] == recomputed and all(plain_calls)
    for (key, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-10, rtol=0, msg=key)


def test_chunked_loss_changes_nothing(reference, tmp_path):
    # 37-token chunks: several per 128-token pack, the last one short
    cli_ok("llama2", *COMMON, "--loss-chunk", "37", "--out", tmp_path, "--export", tmp_path / "hf")
    assert_same_curve(tmp_path, reference)
    assert_same_weights(tmp_path / "hf", reference / "hf")  # same checkpoint keys: the head keeps its name


def test_chunked_loss_under_isp_and_weight_parallel(reference, tmp_path):
    # FSDP2 keeps the root (with the output head) gathered after forward; the loss reads it there
    torchrun("llama2", *COMMON, "--sp", "2", "--wp", "2", "--loss-chunk", "37", "--out", tmp_path)
    assert_same_curve(tmp_path, reference)


@pytest.mark.parametrize("model, loss, dtype", [("mixtral", [], "float32"), ("mamba", ["--fused-loss"], "float32"),
                                                ("internlm2", [], "float32"), ("llava", ["--fused-loss"], "float64")])
def test_chunked_and_fused_losses_equal_the_full_loss_for_other_heads(train_env, tmp_path, model, loss, dtype):
    # Mixtral adds its router aux loss, Mamba's head gets float32 states, InternLM2's head is called
    # `output`, LLaVA's loss skips image tokens. float32: transformers' MoE kernels take no float64; in float32 the
    # fused loss's second step differs from the full one's by 1e-5 (its gradients sum in another order).
    common = ["--seq-len", "64", "--micro-num", "2", "--steps", "2", "--dtype", dtype, "--seed", "3"]
    cli_ok(model, *common, "--out", tmp_path / "full")
    cli_ok(model, *common, *loss, "--loss-chunk", "20", "--out", tmp_path / "chunked")
    got, want = metrics(tmp_path / "chunked"), metrics(tmp_path / "full")
    assert want[0]["loss"] != want[1]["loss"]  # really training
    # the chunks' sums add up in another order: float32 rounding, no more
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5)


def test_compiled_decoder_layers_and_fused_loss_change_nothing(reference, tmp_path):
    # as on a GPU by default: the fused loss takes the compiled final norm's output, and overwrites it
    result = cli_ok("llama2", *COMMON, "--compile", "--fused-loss", "--out", tmp_path)
    assert "decoder layers compiled, fused linear loss (eager)" in result.output
    got, want = metrics(tmp_path), metrics(reference)
    # inductor fuses (and so reorders) float64 arithmetic: equal to rounding, not bit for bit
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-7)


def test_isp_sp2_equals_sp1(reference, tmp_path):
    # Through the --nproc launcher: torchrun with 2 gloo workers, one ISP group.
    proc = module("llama2", *COMMON, "--nproc", "2", "--sp", "2", "--out", tmp_path)
    assert "world 2 = dp 1 x sp 2" in proc.stdout
    assert_same_curve(tmp_path, reference)


def test_weight_parallel_with_data_parallel_equals_single_process(reference, tmp_path):
    # dp=2 x micro_num 1 reads the same rows per step as dp=1 x micro_num 2;
    # weights FSDP2-sharded over both ranks, then gathered for the export.
    torchrun("llama2", *COMMON, "--micro-num", "1", "--wp", "2", "--out", tmp_path, "--export", tmp_path / "hf")
    assert_same_curve(tmp_path, reference)
    assert_same_weights(tmp_path / "hf", reference / "hf")


def test_loss_goes_down(train_env, tmp_path):
    cli_ok("llama2", "--seq-len", "256", "--steps", "12", "--lr", "1e-2", "--out", tmp_path)
    curve = [r["loss"] for r in metrics(tmp_path)]
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_compile_takes_dense_layers_whole_and_the_norms_of_moe_layers(train_env):
    from hfpatch import modeling, zoo
    from hfpatch.train.parallelize import compile_decoder_layers

    model = modeling.build_model(zoo.resolve("llama2"))
    names = [name for name, _ in model.named_parameters()]
    assert compile_decoder_layers(model) == ["final norm", "layer", "swiglu mlp"]
    assert getattr(model.model.norm, "_compiled_call_impl", None) is not None
    assert all(getattr(layer.forward, "_torchdynamo_orig_callable", None) is not None for layer in model.model.layers)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints and exports keep their keys
    assert getattr(model.forward, "_torchdynamo_orig_callable", None) is None  # embeddings and head stay eager
    # a mixture-of-experts block routes tokens data-dependently: only its norms compile
    moe = modeling.build_model(zoo.resolve("mixtral"))
    assert compile_decoder_layers(moe) == ["final norm", "input_layernorm", "post_attention_layernorm"]


def test_compiled_layers_are_two_graphs_around_the_mlp_and_stop_compiling_after_the_second_pack(train_env):
    """The GPU default's design: a dense layer is two graphs (attention in the first as an op) around its SwiGLU
    MLP, and packs with other document counts and longest documents (the same token count, as the trainer's rows)
    compile nothing new once the second pack has made the layer dynamic. A leaked foreign kernel or a guard on the
    pack would show here."""
    from torch._dynamo.utils import counters

    from hfpatch import modeling, runtime, zoo
    from hfpatch.train.parallelize import compile_decoder_layers

    torch._dynamo.reset()
    counters.clear()
    model = modeling.build_model(zoo.resolve("llama2"))
    compile_decoder_layers(model)
    frames = []
    for lengths in ([20, 12], [8, 8, 16], [32], [5, 7, 9, 11], [10, 22]):
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        with runtime.packed_batch(cu_seqlens, max(lengths)):
            out = model(input_ids=torch.randint(0, 100, (1, 32)), position_ids=positions, use_cache=False)
        out.logits.sum().backward()
        frames.append(counters["frames"]["ok"])
    try:
        # two graphs for all the layers (the same code) and one for the final norm; the second pack recompiles each
        # at most once, dynamic; then nothing
        assert len(model.model.layers) > 1 and frames[0] == 3 and len(set(frames[1:])) == 1 and frames[1] <= 6
        # the layers break only at the fused MLP, which runs eagerly
        assert all("fuse_swiglu_mlp" in reason for reason in counters["graph_break"]), list(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_long_context_levers_change_nothing(reference, tmp_path):
    """--long-context: checkpointing, activation offload (host copies on a CPU) and a 48-token MLP tile (several per
    128-token pack, the last one short) give the reference curve and weights."""
    result = cli_ok("llama2", *COMMON, "--long-context", "--tile-mlp", "48", "--out", tmp_path, "--export", tmp_path / "hf")
    assert "activation checkpointing, activations offloaded to host, MLP in 48-token tiles" in result.output
    assert_same_curve(tmp_path, reference)
    assert_same_weights(tmp_path / "hf", reference / "hf")
