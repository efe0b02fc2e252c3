"""Drift across upstream releases, rebasing a patch by three-way merge, and the legacy 4.x pin."""

import importlib.util
import subprocess
import sys
from datetime import date

import pytest
import torch
import transformers
from click.testing import CliRunner

from hfpatch import actions, drift, modeling, pins, runtime, upstream, zoo
from hfpatch.cli import main
from conformance import DEFAULT_DOCUMENTS, documents

LEGACY = "4.57.6"


def test_drift_reports_identical_clean_and_failing_releases(zoo_copy):
    llama = zoo.resolve("llama2")
    states = {v: drift.check_version(llama, v).state for v in ("5.17.0", "5.16.0", "5.18.0", "5.24.0")}
    assert states == {"5.17.0": "pin", "5.16.0": "identical", "5.18.0": "clean", "5.24.0": "fails"}
    assert "hunk #1" in drift.check_version(llama, "5.24.0").detail


def test_drift_cli_json_and_strict_exit(zoo_copy):
    runner = CliRunner()
    ok = runner.invoke(main, ["drift", "llama2", "--versions", "5.16.0,5.18.0", "--json", "--strict"])
    assert ok.exit_code == 0, ok.output
    assert [r["state"] for r in __import__("json").loads(ok.output)] == ["identical", "clean"]
    failing = runner.invoke(main, ["drift", "llama2", "--versions", "5.24.0", "--strict"])
    assert failing.exit_code == 1 and "fails" in failing.output


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_refresh_rebases_onto_a_real_upstream_change_and_the_result_is_equivalent(zoo_copy, tmp_path):
    llama = zoo.resolve("llama2")
    result = drift.refresh(llama, "5.18.0")
    assert result.conflicts == 0 and result.candidate.name == "transformers-5.18.0.patch.candidate"
    with pytest.raises(drift.DriftError, match="exists"):
        drift.refresh(llama, "5.18.0")  # never overwrites silently
    new_upstream = upstream.materialize("transformers", "5.18.0", "models/llama/modeling_llama.py")
    assert new_upstream != actions.pinned_bytes(llama, "modeling_llama.py")  # a real change
    target = tmp_path / "modeling_llama.py"
    target.write_bytes(new_upstream)
    gnu = subprocess.run(["patch", "--fuzz=0", "--batch", "-s", str(target), str(result.candidate)],
                         capture_output=True, text=True)
    assert gnu.returncode == 0, gnu.stdout + gnu.stderr
    # the rebased 5.18 file still imports against the installed 5.17 package: prove it is equivalent
    module = _load(target, "refreshed_llama_518")
    config = modeling.tiny_config(llama)
    torch.manual_seed(0)
    patched = module.LlamaForCausalLM(config).double()
    reference = transformers.LlamaForCausalLM(config).double()
    reference.load_state_dict(patched.state_dict())
    docs = documents(DEFAULT_DOCUMENTS[0], config.vocab_size)
    row = runtime.build_packed_row(docs)
    with runtime.packed_batch(row.cu_seqlens, row.max_seqlen):
        packed = patched(input_ids=row.input_ids[None], position_ids=row.position_ids[None]).logits[0]
    alone = torch.cat([reference(input_ids=torch.tensor([d])).logits[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-10, rtol=0)
    assert packed.shape[0] == sum(DEFAULT_DOCUMENTS[0])


def test_refresh_of_an_entry_that_reuses_a_patch_writes_the_pin_its_pins_read(zoo_copy):
    """yi reuses llama2's patch: its refresh candidate, once promoted, is the 5.18.0 pin of all three entries."""
    yi = zoo.resolve("yi")
    result = CliRunner().invoke(main, ["refresh", "yi", "--to", "5.18.0"])
    assert result.exit_code == 0, result.output
    candidate = pins.candidate_path(yi, "5.18.0")
    assert str(candidate) in result.output and "reuses llama2's patch" in result.output
    header = pins.read_header(candidate.read_text())
    assert pins.header_problems(header) == [] and header["origin"].startswith("vendor, hfpatch refresh")
    assert header["last-update"] == date.today().isoformat()
    promoted = candidate.with_name(candidate.name.removesuffix(pins.CANDIDATE_SUFFIX))
    candidate.rename(promoted)
    for name in ("yi", "llama2", "internlm1"):
        assert pins.supported(zoo.resolve(name))["5.18.0"].patch == promoted
    check = CliRunner().invoke(main, ["check", "yi"])
    assert check.exit_code == 0, check.output
    assert "ok    yi @ transformers==5.18.0: modeling_llama.py patch (internevo) applies cleanly" in check.output


def test_refresh_reports_conflicts_without_writing_a_patch(zoo_copy):
    result = CliRunner().invoke(main, ["refresh", "llama2", "--to", "5.24.0"])
    assert result.exit_code == 0  # 5.24 merges cleanly even though the pin's patch fails there
    result = CliRunner().invoke(main, ["refresh", "llama2", "--to", LEGACY])
    assert result.exit_code == 1 and "conflict" in result.output
    written = sorted(p.name for p in (zoo_copy.parent / "patches" / "llama2").iterdir())
    assert f"transformers-{LEGACY}.conflicts.py" in written
    assert f"transformers-{LEGACY}.patch" in written  # the committed, hand-resolved legacy patch is untouched


def test_legacy_pin_patch_is_gnu_identical_and_listed(zoo_copy, tmp_path):
    llama = zoo.resolve("llama2")
    available = pins.supported(llama)
    assert set(available) == {"5.17.0", LEGACY}
    assert set(pins.supported(zoo.resolve("yi"))) == {"5.17.0", LEGACY}  # reused with the patch
    legacy = available[LEGACY]
    pristine = actions.pinned_bytes(llama, "modeling_llama.py", legacy)
    ours = tmp_path / "ours.py"
    gnu = tmp_path / "gnu.py"
    ours.write_bytes(pristine)
    gnu.write_bytes(pristine)
    assert subprocess.run(["patch", "--fuzz=0", "--batch", "-s", str(gnu), str(legacy.patch)]).returncode == 0
    from hfpatch.patching import apply_patch
    apply_patch(legacy.patch.read_text(), target_file=ours)
    assert ours.read_bytes() == gnu.read_bytes()


@pytest.mark.skipif(transformers.__version__ != LEGACY, reason="runs in the legacy-pin environment")
def test_legacy_environment_picks_the_legacy_patch(zoo_copy):
    llama = zoo.resolve("llama2")
    assert pins.active_pin(llama).version == LEGACY
    CliRunner().invoke(main, ["sync", "llama2"])
    assert actions.file_state(llama, "modeling_llama.py").state == "pristine"
