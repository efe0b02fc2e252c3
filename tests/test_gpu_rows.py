"""scripts/gpu_rows.py on the CPU (two rows, two steps; float32 against float64, reference attention) and the table
scripts/gpu_rows_report.py renders from its JSON."""

import importlib.util
import json
import math
import sys

import pytest

from test_train_common import REPO, train_env  # noqa: F401  (a private zoo and cache for the runs)

WORDS = "the packed rows keep every document apart while the padded batches waste their slots on padding".split()


def _script(name: str):
    if name not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture(scope="module")
def rows():
    return _script("gpu_rows")


@pytest.fixture(scope="module")
def results(rows, train_env, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("rows")
    data = out / "docs.jsonl"  # small documents of many lengths: several to a 64-token row
    data.write_text("".join(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + 7 * i % 40))}) + "\n"
                            for i in range(60)))
    code = rows.main(["--device", "cpu", "--out", str(out), "--rows", "llama2,mamba", "--steps", "2",
                      "--seq-len", "64", "--data", str(data)])
    return out, code


def _stage(results, name):
    return json.loads((results[0] / f"{name}.json").read_text())


def test_the_run_succeeds_and_records_its_environment(results, rows):
    assert results[1] == 0
    env = _stage(results, "numerics")["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "torch.float32" and env["reference_dtype"] == "torch.float64"
    assert env["all_rows"] == list(rows.ROW_NAMES) and len(env["all_rows"]) == 10
    assert env["torch"] and env["packages"]["transformers"] and env["attention_backend"] == "reference"


def test_numerics_packed_equals_alone_and_the_guard_trips(results):
    numerics = _stage(results, "numerics")["rows"]
    assert set(numerics) == {"llama2", "mamba"}
    for row, result in numerics.items():
        assert result["status"] == "ok" and result["passed"], (row, result)
        packed, alone = result["errors"]["packed"], result["errors"]["alone"]
        assert {"output", "output_max", "loss", "grads"} <= set(packed) and 0 < packed["output"] < 1e-5 and alone["grads"] > 0
        assert result["leak_guard"]["fails_the_rule"] and result["leak_guard"]["errors"]["output_max"] > 1e-3
    assert numerics["llama2"]["attention_backends"] == {"causal": "reference"}
    assert numerics["mamba"]["attention_backends"] == "none (selective scan)"


def test_training_runs_packed_and_padded_on_the_same_documents(results):
    train = _stage(results, "train")["rows"]
    for row in ("llama2", "mamba"):
        packed, padded = train[row]["packed"], train[row]["padded"]
        for run in (packed, padded):
            assert run["status"] == "ok" and run["steps"] == 2 and run["tokens_per_s"] > 0, run
            assert run["median_step_tokens_per_s"] > 0 and run["slowest_step_s"] > 0
            assert all(math.isfinite(x) for x in run["losses"]) and run["peak_mem_gib"] is None  # CPU: no CUDA memory
            assert run["command"].startswith(f"hfpatch train {row} ") and "--set total_steps=2" in run["command"]
        assert "--set data.use_packed_dataset=False" in padded["command"]
        # float32, the same documents and targets: the same loss curve either way
        assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-5)
        assert (results[0] / "runs" / f"{row}_packed" / "metrics.jsonl").exists()
        assert not (results[0] / "runs" / f"{row}_packed" / "checkpoints").exists()


def test_mamba_stage_compares_the_same_tokens(results):
    mamba = _stage(results, "mamba")
    speed = mamba["speed"]
    assert speed["status"] == "ok" and speed["packed"]["tokens"] == speed["padded_unpatched"]["tokens"] > 0
    assert speed["speedup"] > 0 and speed["loss_relative_difference"] < 1e-5  # same targets, float32
    points = mamba["activations"]["points"]
    assert [p["rows"] for p in points] == [1, 2, 4]
    assert points[0]["real_tokens"] < points[1]["real_tokens"] < points[2]["real_tokens"]
    for point in points:
        assert point["packed"]["saved_kib_per_token"] > 0 and point["padded_unpatched"]["saved_kib_per_token"] > 0


def test_two_gpu_stage_says_why_it_did_not_run(results):
    assert _stage(results, "two_gpus")["status"] == "not run: --two-gpus not given"


def test_report_renders_one_table_of_ten_rows(results, rows, tmp_path):
    report = _script("gpu_rows_report")
    out = tmp_path / "gpu_rows.md"
    assert report.main([str(results[0]), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 12 and table[0].startswith("| row | numerics")  # header, separator, ten rows
    cells = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in table[2:]}
    assert list(cells) == list(rows.ROW_NAMES)
    assert cells["llama2"][1].startswith("pass: logits") and cells["mamba"][1].startswith("pass: logits")
    assert cells["llama2"][2] != "not run" and cells["mamba"][4].endswith("×")
    assert cells["yi"][1] == "not run" and cells["flux"][3] == "not run"
    assert all(c[-1] == "not run: --two-gpus not given |" for c in cells.values())
    assert any(line.startswith("- Mamba, whole model") for line in lines)


def test_report_merges_runs_later_measured_cells_win(results, tmp_path):
    """A later run that measured only llama2's padded layout (and failed its numerics) fills that cell; every other
    cell keeps the first run's result."""
    report = _script("gpu_rows_report")
    first = report.load(results[0])
    later = {"train": {**first["train"], "rows": {"llama2": {"padded": {**first["train"]["rows"]["llama2"]["padded"],
                                                                       "median_step_tokens_per_s": 12345.0}}}},
             "numerics": {**first["numerics"], "rows": {"llama2": {"status": "error", "error": "boom"}}}}
    later_dir = tmp_path / "later"
    later_dir.mkdir()
    for name, stage in later.items():
        (later_dir / f"{name}.json").write_text(json.dumps(stage))
    out = tmp_path / "merged.md"
    assert report.main([str(results[0]), str(later_dir), "--out", str(out)]) == 0
    cells = {line.split(" | ")[0].removeprefix("| "): line.split(" | ") for line in out.read_text().splitlines()[4:]
             if line.startswith("| ")}
    assert cells["llama2"][3] == "12.3K" and cells["llama2"][1].startswith("pass: logits")
    merged = report.merge([first, later])
    assert merged["train"]["rows"]["llama2"]["packed"] == first["train"]["rows"]["llama2"]["packed"]
    assert merged["train"]["rows"]["mamba"] == first["train"]["rows"]["mamba"]


def test_report_shows_the_median_step_rate_and_the_mean_of_runs_without_one():
    report = _script("gpu_rows_report")
    assert report.steady_rate({"tokens_per_s": 40e3, "median_step_tokens_per_s": 85e3}) == 85e3
    assert report.steady_rate({"tokens_per_s": 40e3}) == 40e3  # a run recorded before the median was


def test_report_of_an_empty_dir_is_one_error_line(tmp_path, capsys):
    assert _script("gpu_rows_report").main([str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and not (tmp_path / "r.md").exists()


def test_unknown_row_is_one_error_line(rows, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rows.parse_args(["--device", "cpu", "--out", "x", "--rows", "llama2,gpt5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: unknown row gpt5; choose from {', '.join(rows.ROW_NAMES)}"


def test_every_row_has_a_valid_gpu_size_with_the_real_head_dim(rows, train_env):  # noqa: F811
    """The GPU sizes are what the one-shot GPU run builds: each must be a config the trainer accepts."""
    from hfpatch.train import resolve_config
    from hfpatch.train.families import LANGUAGE_FAMILIES, family_of, model_config, resolve_entry

    for row in rows.ROWS:
        entry = resolve_entry(row.name)
        cfg = resolve_config(row.name, assignments=rows.model_settings(row, "gpu"))
        config = model_config(entry, cfg, 1024 if entry.family in LANGUAGE_FAMILIES else None)
        if row.name != "mamba":
            assert family_of(entry).head_dim(config) == 128, row.name
    assert config["axes_dims_rope"] == [16, 56, 56]  # Flux, the last row
