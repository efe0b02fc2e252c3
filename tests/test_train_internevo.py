"""InternEvo config files: every mapped key, the single warning, the refusals, --print-config, a tiny run.

The config files under tests/internevo_configs/ are written for these tests in InternEvo's config
language and key set (InternEvo's configs/7B_sft.py, InternEvo-HFModels' examples/*/config.py). Their
hub ids resolve through a Hugging Face cache made here, never the network.
"""

import json
import math

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from hfpatch import zoo
from hfpatch.train import corpus
from hfpatch.train.build import tiny_config
from hfpatch.train.families import model_config
from hfpatch.train.config import resolve_config
from hfpatch.train.tokenizer import default_tokenizer_json, tokenizer_from_json
from test_train_common import REPO, cli, cli_ok, error_lines, metrics, train_env  # noqa: F401

CONFIGS = REPO / "tests" / "internevo_configs"
LLM, FLUX = CONFIGS / "llm_sft.py", CONFIGS / "flux_sft.py"
TRAIN_DOCS = [f"Story {i}: the cat sat on the mat and looked at the {i % 7} birds." for i in range(40)]
# what llm_sft.py sets that has no effect here, in file order, each listed once
LLM_IGNORED = (
    "ckpt.async_upload", "ckpt.async_upload_tmp_folder", "ckpt.oss_snapshot_freq", "data.valid_micro_num",
    "data.valid_every", "data.skip_batches", "data.rampup_batch_size", "data.min_length", "data.valid_folder",
    "data.use_shm", "grad_scaler", "hybrid_zero_optimizer.overlap_sync_grad", "hybrid_zero_optimizer.overlap_sync_param",
    "hybrid_zero_optimizer.reduce_bucket_size", "beta2_scheduler", "use_fp32_norm", "model.embed_split_hidden",
    "model.parallel_output", "model.norm_type", "model.layer_norm_epsilon", "model.use_flash_attn", "model.num_chunks",
    "parallel.pipeline.interleaved_overlap", "parallel.weight.overlap", "parallel.weight.memory_pool",
    "cudnn_deterministic", "cudnn_benchmark", "monitor",
)


def _snapshot(cache, kind, repo_id):
    """An entry of huggingface_hub's cache layout: <kind>s--org--name/{refs/main, snapshots/<rev>/}."""
    root = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123456789abcdef")
    snapshot = root / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(train_env, tmp_path_factory):
    """A local HF cache with llm_sft.py's checkpoint + tokenizer and its dataset (train and validation splits)."""
    cache = tmp_path_factory.mktemp("hf-hub")
    model_dir = _snapshot(cache, "model", "tiny-org/tiny-llama")
    config = AutoConfig.for_model("llama", vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer_from_json(default_tokenizer_json(corpus.default_documents())).save(model_dir)
    data_dir = _snapshot(cache, "dataset", "tiny-org/tiny-stories") / "data"
    data_dir.mkdir()
    (data_dir / "train-00000-of-00001.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TRAIN_DOCS))
    (data_dir / "validation-00000-of-00001.jsonl").write_text(json.dumps({"text": "only in validation"}) + "\n")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_CACHE", str(cache))
    patch.setenv("HF_HUB_OFFLINE", "1")
    yield {"model": str(model_dir), "data": str(data_dir.parent)}
    patch.undo()


def test_every_internevo_key_with_an_equivalent_is_mapped(hub_cache):
    cfg = resolve_config("llama2", LLM)
    # optimizer, schedule, clipping, steps: the file's values, not the defaults (3e-3, 30 steps)
    assert (cfg.lr, tuple(cfg.adam_betas), cfg.adam_eps, cfg.weight_decay) == (1e-4, (0.9, 0.98), 1e-6, 0.05)
    assert (cfg.total_steps, cfg.min_lr, cfg.warmup_ratio, cfg.warmup, cfg.clip_grad_norm) == (50_000, 1e-5, 0.02, 1000, 0.5)
    # checkpoints: folder without its local: prefix, interval, saving on, auto resume, the HF checkpoint to start from
    assert (cfg.out, cfg.checkpoint_every, cfg.save_checkpoints, cfg.resume) == ("runs/internevo_2x064", 1000, True, "auto")
    assert cfg.model_path == cfg.tokenizer_path == hub_cache["model"] and cfg.data_path == hub_cache["data"]
    # data, parallel, model
    assert (cfg.seq_len, cfg.micro_num, cfg.micro_bsz, cfg.packed) == (2048, 2, 1, True)
    assert (cfg.sp, cfg.tensor_mode, cfg.wp, cfg.zero1, cfg.pipeline_size) == (1, "mtp", 1, -1, 1)
    assert (cfg.dtype, cfg.activation_checkpointing) == ("float32", 0.5)
    # InternLM model keys -> the transformers config; mlp_ratio as InternEvo sizes its MLP: int(64 * 8/3) -> 256
    assert cfg.model_overrides == {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "vocab_size": 1024, "intermediate_size": 256}
    assert cfg.ignored == LLM_IGNORED


def test_mlp_ratio_sizes_the_mlp_as_internevo_does():
    from hfpatch.train.internevo import intermediate_size

    assert intermediate_size(4096, 8 / 3) == 11008  # Llama-2-7B / InternLM-7B
    assert intermediate_size(64, 8 / 3) == 256 and intermediate_size(512, 4) == 2048


def test_a_tiny_run_from_an_internevo_file(hub_cache, tmp_path):
    result = cli_ok("llama2", "-c", LLM, "--steps", "2", "--seq-len", "64", "--out", tmp_path)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: ignored InternEvo settings with no effect here: {', '.join(LLM_IGNORED)}"]
    # the train split of the cached dataset only, the cached tokenizer
    assert f"{len(TRAIN_DOCS)} documents" in result.output and f"tokenizer: {hub_cache['model']}" in result.output
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    # adam.lr 1e-4 and eta_min 1e-5 over a 2-step cosine (warmup int(2 x 0.02) = 0): 1e-5 + 9e-5 x (1 + cos(pi/2)) / 2
    assert records[0]["lr"] == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert (tmp_path / "checkpoints").is_dir()  # ckpt.enable_save_ckpt=True
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_path"] == hub_cache["model"] and saved["model"]["checkpoint"] == 0.5


def test_print_config_names_the_source_of_each_value(hub_cache):
    result = cli_ok("llama2", "-c", LLM, "--lr", "0.5", "--set", "data.seq_len=64", "--print-config")
    printed = json.loads(result.stdout)
    assert printed["lr"] == 0.5 and printed["data"]["seq_len"] == 64 and printed["total_steps"] == 50_000
    sources = printed["sources"]
    assert sources["lr"] == "--lr" and sources["data.seq_len"] == "--set data.seq_len" and sources["seed"] == "default"
    assert sources["total_steps"] == "llm_sft.py: data.total_steps"
    assert sources["adam_betas"] == "llm_sft.py: adam.adam_beta1, adam.adam_beta2"
    assert sources["model.dtype"] == "llm_sft.py: model.dtype ('torch.float32')"
    assert sources["out"] == "llm_sft.py: ckpt.save_ckpt_folder ('local:runs/internevo_2x064')"
    assert sources["data.tokenizer_path"] == "llm_sft.py: data.tokenizer_path (tiny-org/tiny-llama from the HF cache)"
    assert sources["model.num_hidden_layers"] == "llm_sft.py: model.num_layers"
    assert len([line for line in result.stderr.splitlines() if line.startswith("warning:")]) == 1


def test_command_line_over_an_internevo_file(hub_cache):
    """--sp is the ISP size, whatever tensor mode the file names; --set takes InternEvo keys too."""
    cfg = resolve_config("llama2", LLM, {"parallel.tensor.size": 2}, ["adam.lr=0.25"])
    assert (cfg.sp, cfg.tensor_mode, str(cfg.sources["parallel.tensor.mode"])) == (2, "isp", "--sp")
    assert cfg.lr == 0.25 and str(cfg.sources["lr"]) == "--set adam.lr"


def test_flux_keeps_its_architecture(train_env):
    """The InternLM model section of an InternEvo Flux file describes no Flux: ignored, listed once."""
    cfg = resolve_config("flux", FLUX)
    assert cfg.model_overrides == {}
    entry = zoo.resolve("flux")
    assert model_config(entry, cfg, vocab_size=None) == tiny_config(entry)
    for key in ("model.num_attention_heads", "model.vocab_size", "model.hidden_size", "model.num_layers",
                "model.mlp_ratio", "model.norm_type", "flux", "ckpt.load_ckpt_info", "ckpt.load_ckpt_folder"):
        assert cfg.ignored.count(key) == 1, key
    # InternEvo reads load_ckpt_info only with auto_resume=False; its own checkpoint format is then refused (below)
    assert (cfg.model_path, cfg.dtype, cfg.out, cfg.save_checkpoints, cfg.lr) == (None, "auto", "runs/flux_internevo", False, 1e-4)


def test_an_hfpatch_config_file_keeps_its_model_keys(train_env, tmp_path):
    """Without InternEvo's own sections a file is an hfpatch config: model keys override the model's config."""
    path = tmp_path / "flux.py"
    path.write_text("model = dict(num_layers=1, checkpoint=0.25)\ndata = dict(valid_every=5)\n")
    cfg = resolve_config("flux", path)
    assert cfg.model_overrides == {"num_layers": 1} and cfg.activation_checkpointing == 0.25
    assert cfg.ignored == ("data.valid_every",)  # InternEvo's keys are taken in any file; data is not named whole


INTERNEVO = 'adam = dict(lr=1e-4)\ndata = dict(total_steps=50)\n'  # makes a file an InternEvo config
REFUSALS = {
    "pipeline parallel": ("parallel = dict(pipeline=dict(size=2))", "parallel.pipeline.size must be one of 1, got 2"),
    "tensor parallel other than isp": (
        "parallel = dict(tensor=dict(size=2, mode='mtp'))",
        "parallel.tensor.mode must be one of isp when parallel.tensor.size > 1, got 'mtp' with size 2"),
    "fp16 and its loss scaler": (
        "model = dict(dtype='torch.float16')\ngrad_scaler = dict(fp16=dict(initial_scale=2**16))",
        "model.dtype='torch.float16': fp16 training needs InternEvo's loss scaler (grad_scaler)"),
    "label smoothing": ("loss = dict(label_smoothing=0.1)", "loss.label_smoothing=0.1 is not supported"),
    "a beta2 schedule": ("beta2_scheduler = dict(c=0.5)", "beta2_scheduler.c=0.5 is not supported"),
    "a schedule longer than the run": ("lr_scheduler = dict(total_steps=100)",
                                       "lr_scheduler.total_steps=100 is not supported: the schedule spans data.total_steps"),
    "object storage": ("ckpt = dict(save_ckpt_folder='boto3:s3://bucket/ckpt')",
                       "ckpt.save_ckpt_folder='boto3:s3://bucket/ckpt': boto3 storage is not supported"),
    "an InternEvo checkpoint to load": (
        "ckpt = dict(load_ckpt_info=dict(path='local:llm_ckpts/49', content=('model',), ckpt_type='internevo'), "
        "auto_resume=False)", "ckpt.load_ckpt_info: ckpt_type='internevo' checkpoints cannot be loaded by hfpatch"),
    "a hub id not in the cache": (
        "data = dict(tokenizer_path='nobody/nothing')",
        "data.tokenizer_path: 'nobody/nothing' is neither a local path nor a model in the local Hugging Face cache"),
    "a checkpoint fraction above 1": ("model = dict(checkpoint=1.5)", "model.checkpoint must be <= 1, got 1.5"),
    "mlp_ratio without hidden_size": ("model = dict(mlp_ratio=4)", "model.mlp_ratio needs model.hidden_size"),
    "a typo in a shared section": ("data = dict(seqlen=64)", "unknown config key 'data.seqlen'; did you mean data.seq_len?"),
    "a typo in an InternEvo section": ("lr_scheduler = dict(warmup_ration=0.1)",
                                       "did you mean lr_scheduler.warmup_ratio?"),
    "a wrong type": ("adam = dict(lr='fast')", "adam.lr must be int or float, got 'fast'"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_cannot_be_done_here_is_one_error_line_naming_the_key(hub_cache, tmp_path, case):
    text, message = REFUSALS[case]
    path = tmp_path / "config.py"
    path.write_text(f"{INTERNEVO}{text}\n")
    result = cli("llama2", "-c", path, "--steps", "1", "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [error_lines(result)[0]] and error_lines(result)[0].startswith("error: ")
    assert message in error_lines(result)[0]


def test_a_run_dir_that_cannot_be_made_is_one_error_line(hub_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "config.py"
    path.write_text(f"{INTERNEVO}ckpt = dict(save_ckpt_folder='local:{blocker}/ckpts')\n")
    result = cli("llama2", "-c", path, "--steps", "1", "--seq-len", "64")
    assert result.exit_code == 1 and len(error_lines(result)) == 1, result.output
    assert (f"error: out (from config.py: ckpt.save_ckpt_folder ('local:{blocker}/ckpts')) {blocker}/ckpts is not "
            f"writable (Not a directory); pass a directory you can write to") == error_lines(result)[0]
