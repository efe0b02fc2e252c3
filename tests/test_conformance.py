"""The conformance suite over every zoo row (``conformance.py`` has the checks, each manifest's ``[test]`` table
the row's reference class, ISP layouts and options). A new model needs a manifest and a patch, nothing here."""

import copy
import functools

import pytest
import torch

import conformance
from conformance import ATOL, FP32_ATOL, assert_same_grads, case, grads
from hfpatch import modeling, runtime
from runtime_helpers import run_distributed

ROWS = conformance.rows_with_tests()
ISP_CASES = [(name, index) for name in ROWS for index in range(len(conformance.spec(name).isp))]
LABEL_ROWS = [name for name in ROWS if conformance.INPUTS[conformance.spec(name).inputs].has_labels]


@pytest.fixture(autouse=True)
def _zoo(session_zoo):
    yield


@functools.cache
def _prototypes(name: str):
    return case(name).build({})


def built(name: str):
    """A fresh (patched, unpatched reference) pair of the row's test config: copies of one build per session."""
    return copy.deepcopy(_prototypes(name))


def test_every_row_with_a_patch_has_a_conformance_table():
    assert ROWS
    for name in ROWS:
        s = conformance.spec(name)
        reference = conformance.reference_class(s)
        assert reference.__name__ == s.entry.model_class and reference is not modeling.model_class(s.entry)
        assert s.isp, f"{name}: no ISP layout"


@pytest.mark.parametrize("name", ROWS)
def test_runtime_off_is_the_unpatched_model(name):
    case(name).check_no_runtime(*built(name))


@pytest.mark.parametrize("name", ROWS)
def test_packed_equals_each_document_alone_and_one_segment_would_leak(name, monkeypatch):
    """Outputs, loss and every gradient of a pack (with a padding segment) equal the documents run alone (also
    with positions continuing across the pack, where the model takes positions: isolation comes from cu_seqlens,
    not from transformers' detection of position resets); the pack as one segment differs (the guard)."""
    conformance.check_packed(case(name), *built(name), monkeypatch)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", ROWS)
def test_checkpointed_recompute_sees_the_pack_after_it_is_withdrawn(name, reentrant):
    """The README's pattern: the pack published around the forward only, backward after the with-block. The
    layers' recompute must attend over the same documents (or fail loudly): gradients equal the plain run's."""
    adapter = case(name)
    patched, _ = built(name)
    patched.train()  # no dropout in the tiny configs
    pack = adapter.packs(patched)[0]
    adapter.loss(adapter.forward(patched, pack), pack).backward()
    plain = grads(patched)
    patched.zero_grad(set_to_none=True)
    adapter.enable_checkpointing(patched, reentrant)
    loss = adapter.loss(adapter.forward(patched, pack), pack)  # forward() withdraws the pack when it returns
    assert not runtime.gpc.config.data.get("use_packed_dataset")
    loss.backward()
    assert_same_grads(patched, plain, ATOL, adapter.spec.float32_grads)


@pytest.mark.parametrize("name", LABEL_ROWS)
def test_labels_follow_transformers_convention(name):
    """model(labels=...) shifts labels itself, as transformers does: a DataCollatorWithFlattening batch packed with
    the runtime on gives the unpatched model's loss on the documents padded; with the runtime off, its own."""
    case(name).check_labels(*built(name))


@pytest.fixture(scope="session")
def isp_runs(request, session_zoo):
    """Every selected ISP case, run once: one group of gloo processes per sp size, each running all its cases."""
    wanted = sorted({(item.callspec.params["name"], item.callspec.params["layout"]) for item in request.session.items
                     if getattr(item, "originalname", None) == "test_isp_equals_single_process"})
    for name, _ in wanted:  # patched before the workers import the module
        modeling.load_patched_module(case(name).spec.entry)
    results = {}
    for sp in sorted({case(name).spec.isp[index]["sp"] for name, index in wanted}):
        group = [(name, index) for name, index in wanted if case(name).spec.isp[index]["sp"] == sp]
        results.update(run_distributed(conformance.isp_worker, sp, group, timeout=900)[0])
    return results


def _numpy_grads(result: dict) -> dict:
    return {name: torch.from_numpy(g) for name, g in result["grads"].items()}


@pytest.mark.parametrize("name, layout", ISP_CASES, ids=[f"{n}-{conformance.spec(n).isp[i]}" for n, i in ISP_CASES])
def test_isp_equals_single_process(name, layout, isp_runs):
    """sp gloo ranks == one process: each pack's outputs, loss and gradients; model(labels=...) (transformers'
    convention, the shift crossing the ranks' slices); unpacked rows (ISP without a pack) against the unpatched
    model."""
    adapter = case(name)
    result = isp_runs[(name, layout)]
    assert "error" not in result, result.get("error")
    spec_layout = adapter.spec.isp[layout]
    sp = spec_layout["sp"]
    patched, reference = adapter.build(spec_layout.get("config", {}))
    float32 = adapter.spec.float32_grads
    for index, (pack, isp) in enumerate(zip(adapter.packs(patched, sp), result["packs"], strict=True)):
        patched.zero_grad(set_to_none=True)
        out = adapter.forward(patched, pack)
        loss = adapter.loss(out, pack)
        loss.backward()
        torch.testing.assert_close(torch.from_numpy(isp["out"]), out.detach(), atol=ATOL, rtol=0, msg=f"pack {index}")
        assert abs(isp["loss"] - loss.item()) < ATOL, (index, isp["loss"], loss.item())
        assert_same_grads(patched, _numpy_grads(isp), ATOL, float32, what=f"pack {index}:")
    if adapter.has_labels:
        batch = adapter.flattened(patched, adapter.packs(patched, sp)[0], sp)
        moe = hasattr(patched.config, "router_aux_loss_coef")
        with torch.no_grad():
            expected = adapter.model_loss(patched, batch, moe_router=moe)
        assert abs(result["labels"]["loss"] - expected.loss.item()) < FP32_ATOL, (result["labels"], expected.loss)
        if moe:
            assert abs(result["labels"]["aux"] - expected.aux_loss.item()) < ATOL
    rows = adapter.rows(reference)
    out = adapter.rows_forward(reference, rows)
    loss = adapter.rows_loss(out, rows, rows)
    loss.backward()
    isp = result["rows"]
    torch.testing.assert_close(torch.from_numpy(isp["out"]), out.detach(), atol=ATOL, rtol=0, msg="rows")
    assert abs(isp["loss"] - loss.item()) < ATOL
    assert_same_grads(reference, _numpy_grads(isp), ATOL, float32, what="rows:")
    if adapter.has_labels:
        with torch.no_grad():
            assert abs(isp["model_loss"] - adapter.rows_model_loss(reference, rows).item()) < FP32_ATOL
