"""The zoo and the CLI: sync, check, apply/revert, engines, --target, list --json."""

import json
import py_compile
import subprocess

import pytest
from click.testing import CliRunner

from hfpatch import actions, engines, pins, upstream, zoo
from hfpatch.cli import main

SEED_DIRS = {
    "meta_llama/Llama_2_7b_hf", "internlm/internlm2_7b", "Qwen/Qwen2_7B", "mistralai/mixtral_8x7B_v0_1",
    "baichuan_inc/Baichuan2_7B_Base", "internlm/internlm_7b", "Yi/Yi_6B", "llava_hf/llava_1_5_7b_hf", "mamba", "flux",
}


def run(*args, ok=True):
    result = CliRunner().invoke(main, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def ready_entries():
    return [e for e in zoo.load_zoo() if e.has_patch]


def test_list_json_has_all_ten_seed_models_with_their_real_state(zoo_copy):
    rows = json.loads(run("list", "--json").output)
    assert {r["path"].removeprefix("huggingface_model/") for r in rows} == SEED_DIRS
    for row in rows:
        entry = zoo.resolve(row["model"])
        assert row["patch"].startswith("ready") == entry.has_patch
        if entry.has_patch:  # a row claiming varlen must have a patch file that applies
            assert pins.default_patch_path(entry).is_file()
    llama = next(r for r in rows if r["model"] == "llama2")
    assert llama["varlen"] and llama["isp"] and llama["upstream"] == "transformers==5.17.0"


def test_names_resolve_case_insensitively_with_did_you_mean(zoo_copy):
    for name in ("llama2", "LLAMA2", "Llama_2_7b_hf", "meta-llama/Llama-2-7b-hf", "huggingface_model/meta_llama/Llama_2_7b_hf"):
        assert zoo.resolve(name).name == "llama2"
    with pytest.raises(zoo.ZooError, match="did you mean llama2"):
        zoo.resolve("lama2")
    result = run("show", "lama2", ok=False)
    assert result.exit_code == 1 and "did you mean" in result.output and "Traceback" not in result.output


def test_sync_check_apply_revert_roundtrip_for_every_patch(zoo_copy):
    assert run("check").exit_code == 0
    for entry in ready_entries():
        run("sync", entry.name)
        path = entry.directory / entry.patch_target
        pristine = path.read_bytes()
        assert upstream.sha256_bytes(pristine) == entry.upstream.files[entry.patch_target]
        assert "patched" in run("apply", entry.name).output
        patched = path.read_bytes()
        assert "already patched" in run("apply", entry.name).output  # twice: a no-op
        assert path.read_bytes() == patched
        assert "patched" in run("status", entry.name).output
        assert run("diff", entry.name).output.startswith(f"--- {entry.patch_target} (pin)")
        run("revert", entry.name)
        assert path.read_bytes() == pristine


def test_hfpatch_apply_equals_gnu_patch_for_every_zoo_patch(zoo_copy, tmp_path):
    for entry in ready_entries():
        pristine = actions.pinned_bytes(entry, entry.patch_target)
        gnu_file = tmp_path / f"{entry.name}_{entry.patch_target}"
        gnu_file.write_bytes(pristine)
        done = subprocess.run(["patch", "--fuzz=0", "--batch", "-s", str(gnu_file), str(pins.default_patch_path(entry))],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        run("sync", entry.name)
        run("apply", entry.name)
        assert (entry.directory / entry.patch_target).read_bytes() == gnu_file.read_bytes()


def test_sync_refuses_a_hash_mismatch_naming_both_hashes(zoo_copy):
    manifest = zoo_copy / "meta_llama/Llama_2_7b_hf/model.toml"
    good = zoo.resolve("llama2").upstream.files["modeling_llama.py"]
    manifest.write_text(manifest.read_text().replace(good, "0" * 64))
    result = run("sync", "llama2", ok=False)
    assert result.exit_code == 1
    assert "0" * 64 in result.output and good in result.output
    assert not (zoo_copy / "meta_llama/Llama_2_7b_hf/modeling_llama.py").exists()  # nothing half-written


def test_sync_refuses_local_edits_unless_forced(zoo_copy):
    run("sync", "llama2")
    path = zoo_copy / "meta_llama/Llama_2_7b_hf/modeling_llama.py"
    path.write_text(path.read_text() + "# my edit\n")
    assert "local changes" in run("sync", "llama2", ok=False).output
    run("sync", "llama2", "--force")
    assert "# my edit" not in path.read_text()


def test_materialized_file_has_absolute_imports(zoo_copy):
    run("sync", "llama2")
    text = (zoo_copy / "meta_llama/Llama_2_7b_hf/modeling_llama.py").read_text()
    assert "from ..." not in text and "from .configuration" not in text
    assert "from transformers.models.llama.configuration_llama import LlamaConfig" in text


def test_absolutize_imports_rule():
    source = "from ...utils import x\nfrom .configuration_llama import C\nfrom .. import models\n"
    assert upstream.absolutize_imports(source, "transformers.models.llama") == (
        "from transformers.utils import x\nfrom transformers.models.llama.configuration_llama import C\n"
        "from transformers.models import models\n")


def test_one_cache_dir_hfpatch_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    """Wheels (upstream), tokenizers and patched copies (trainer) share one cache dir; it follows $XDG_CACHE_HOME."""
    from hfpatch import files

    monkeypatch.delenv("HFPATCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tmp_path / "xdg" / "hfpatch"
    with pytest.raises(upstream.UpstreamError, match=str(tmp_path / "xdg" / "hfpatch" / "wheels")):
        upstream.wheel_path("transformers", "0.0.0", fetch=False)
    monkeypatch.setenv("HFPATCH_CACHE", str(tmp_path / "mine"))
    assert files.cache_dir() == tmp_path / "mine"


def test_internevo_engine_gives_the_seed_imports_and_compiles(zoo_copy, tmp_path):
    run("sync", "llama2")
    run("apply", "llama2", "--engine", "internevo")
    path = zoo_copy / "meta_llama/Llama_2_7b_hf/modeling_llama.py"
    text = path.read_text()
    for line in engines.ENGINE_IMPORTS["internevo"]:
        assert f"\n{line}\n" in text
    assert "hfpatch.runtime" not in text
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    assert "patched (internevo)" in run("status", "llama2").output
    assert "revert" in run("apply", "llama2", ok=False).output  # other engine refused, not mixed
    run("revert", "llama2")
    assert "pristine" in run("status", "llama2").output


def test_target_flag_checks_the_hash_first(zoo_copy, tmp_path):
    entry = zoo.resolve("llama2")
    mine = tmp_path / "my_modeling_llama.py"
    mine.write_bytes(actions.pinned_bytes(entry, "modeling_llama.py"))
    run("apply", "llama2", "--target", str(mine))
    assert "isp_flash_attn_varlen_func" in mine.read_text()
    run("revert", "llama2", "--target", str(mine))
    other = tmp_path / "other.py"
    other.write_text("print('not llama')\n")
    result = run("apply", "llama2", "--target", str(other), ok=False)
    assert "not the pinned upstream" in result.output and other.read_text() == "print('not llama')\n"


def test_patched_file_imports_and_builds_a_model(zoo_copy):
    """Every ready entry's patched module imports with the hfpatch runtime and builds its tiny config."""
    import torch

    from hfpatch import modeling

    for entry in ready_entries():
        zoo_state = actions.file_state(entry, entry.patch_target).state
        model = modeling.build_model(entry)
        model.reset_parameters()
        assert type(model).__module__ == f"hfpatch_zoo.{entry.name}.{entry.patch_target.removesuffix('.py')}"
        assert actions.file_state(entry, entry.patch_target).state == zoo_state  # a patched copy, the zoo untouched
        if entry.family == "diffusion-transformer":  # no logits: tests/test_flux_equivalence.py runs its forward
            continue
        out = model(torch.tensor([[1, 2, 3]]))
        assert out.logits.shape == (1, 3, model.config.get_text_config().vocab_size)
