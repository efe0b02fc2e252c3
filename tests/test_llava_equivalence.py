"""The patched LLaVA against independent references: transformers' unpatched Llava with the same
weights (each sample alone, and with the runtime off), and the single-process run for ISP."""

import py_compile

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from hfpatch import engines, pins, runtime, zoo
from hfpatch.cli import main
from hfpatch.train.multimodal import pack_llava_samples
from llava_cases import isp_worker, patched_and_reference, sample_labels, samples, unpacked_rows
from runtime_helpers import run_distributed

ATOL = 1e-10


@pytest.fixture(autouse=True)
def _zoo(zoo_copy):
    yield


def _assert_grads_equal(patched, reference, atol=ATOL):
    for (name, p), (_, r) in zip(patched.named_parameters(), reference.named_parameters()):
        # CLIP's last layer and post_layernorm get no grad: LLaVA reads the vision tower's second-to-last layer
        assert (p.grad is None) == (r.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, atol=atol, rtol=0, msg=name)


def _packed_forward(model, batch, position_ids=None):
    with runtime.packed_batch(batch["cu_seqlens"], batch["max_seqlen"]):
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     position_ids=batch["position_ids"] if position_ids is None else position_ids).logits[0]


def _alone(reference, sample_list, image_token_id):
    """Logits of each sample run alone through the unpatched model, and the token-mean loss over all samples
    (image tokens labelled -100 as transformers' Llava training expects; summed in float64 here because
    transformers' own loss upcasts to float32 only)."""
    logits, loss_sum, targets = [], 0.0, 0
    for sample in sample_list:
        ids = torch.tensor([sample.input_ids])
        labels = sample_labels(ids, image_token_id)[0, 1:]
        out = reference(input_ids=ids, pixel_values=sample.pixel_values).logits[0]
        logits.append(out)
        loss_sum = loss_sum + F.cross_entropy(out[:-1], labels, ignore_index=-100, reduction="sum")
        targets += int((labels != -100).sum())
    return torch.cat(logits), loss_sum / targets


def test_no_runtime_patched_equals_unpatched_forward_backward_generate():
    patched, reference = patched_and_reference()
    config = patched.config
    batch_samples = samples(config, seed=1, layouts=[(2, 1, 5), (4, 1, 1)])  # lengths 11 and 9: one padded row
    length = max(len(s.input_ids) for s in batch_samples)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(batch_samples):  # left padding, exercising transformers' own mask path
        ids[row, length - len(sample.input_ids):] = torch.tensor(sample.input_ids)
        mask[row, length - len(sample.input_ids):] = 1
    pixels = torch.cat([s.pixel_values for s in batch_samples])
    labels = sample_labels(ids, config.image_token_id).masked_fill(mask == 0, -100)
    out_p = patched(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    out_r = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert patched.config.text_config._attn_implementation == "sdpa"  # no pack, no ISP: transformers' own path
    torch.testing.assert_close(out_p.logits, out_r.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_p.loss, out_r.loss, atol=ATOL, rtol=0)
    out_p.loss.backward()
    out_r.loss.backward()
    _assert_grads_equal(patched, reference)
    first = batch_samples[0]
    prompt = torch.tensor([first.input_ids])
    gen_p = patched.generate(input_ids=prompt, pixel_values=first.pixel_values, max_new_tokens=6, do_sample=False)
    gen_r = reference.generate(input_ids=prompt, pixel_values=first.pixel_values, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen_p, gen_r) and gen_p.shape[1] == prompt.shape[1] + 6


def test_after_a_packed_step_the_unpacked_model_is_transformers_again():
    patched, reference = patched_and_reference()
    sample_list = samples(patched.config)
    _packed_forward(patched, pack_llava_samples(sample_list, patched.config.image_token_id))
    assert patched.config.text_config._attn_implementation == "internevo_varlen"
    ids = torch.tensor([sample_list[0].input_ids])
    out_p = patched(input_ids=ids, pixel_values=sample_list[0].pixel_values).logits
    assert patched.config.text_config._attn_implementation == "sdpa"
    torch.testing.assert_close(out_p, reference(input_ids=ids, pixel_values=sample_list[0].pixel_values).logits,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("positions", ["restart per sample", "continue across the pack"])
def test_packed_equals_each_sample_alone(positions):
    patched, reference = patched_and_reference()
    image_token = patched.config.image_token_id
    sample_list = samples(patched.config)
    batch = pack_llava_samples(sample_list, image_token)
    assert int(batch["labels"].eq(image_token).sum()) == 0 and batch["pixel_values"].shape[0] == 4
    length = batch["input_ids"].shape[-1]
    position_ids = None if positions == "restart per sample" else torch.arange(length)[None]
    logits = _packed_forward(patched, batch, position_ids)
    loss = runtime.causal_lm_loss(logits, batch["labels"][0])
    ref_logits, ref_loss = _alone(reference, sample_list, image_token)
    # transformers builds RoPE tables in float32: shifted positions differ at ~1e-8, leaks at ~1e-2
    atol = ATOL if positions == "restart per sample" else 1e-6
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)  # text and image positions
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=0)
    loss.backward()
    ref_loss.backward()
    _assert_grads_equal(patched, reference, atol)  # vision tower and projector included


def test_packing_without_cu_seqlens_would_leak_across_samples():
    """Guard that the test above can fail: one causal segment over the pack differs from alone."""
    patched, reference = patched_and_reference()
    sample_list = samples(patched.config)
    batch = pack_llava_samples(sample_list, patched.config.image_token_id)
    length = batch["input_ids"].shape[-1]
    leaky = _packed_forward(patched, {**batch, "cu_seqlens": torch.tensor([0, length], dtype=torch.int32),
                                      "max_seqlen": length})
    ref_logits, _ = _alone(reference, sample_list, patched.config.image_token_id)
    assert (leaky - ref_logits).abs().max() > 1e-3


def test_activation_checkpointing_recomputes_on_the_pack():
    """The language model's attention path stays as the forward chose it, so a recompute during backward
    (pack still published) gives the same grads; with the pack withdrawn it fails loudly instead of
    attending across samples."""
    patched, _ = patched_and_reference()
    batch = pack_llava_samples(samples(patched.config), patched.config.image_token_id)
    runtime.causal_lm_loss(_packed_forward(patched, batch), batch["labels"][0]).backward()
    plain = {name: p.grad.clone() for name, p in patched.named_parameters() if p.grad is not None}
    patched.zero_grad()
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()  # no dropout in the tiny config
    with runtime.packed_batch(batch["cu_seqlens"], batch["max_seqlen"]):
        logits = patched(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         position_ids=batch["position_ids"]).logits[0]
        runtime.causal_lm_loss(logits, batch["labels"][0]).backward()
    assert plain.keys() == {name for name, p in patched.named_parameters() if p.grad is not None}
    for name, p in patched.named_parameters():
        if name in plain:
            torch.testing.assert_close(p.grad, plain[name], atol=ATOL, rtol=0, msg=name)
    loss = runtime.causal_lm_loss(_packed_forward(patched, batch), batch["labels"][0])
    with pytest.raises(RuntimeError, match="no longer published"):
        loss.backward()


def _run_isp(sp: int, layout: str, overrides: dict):
    return run_distributed(isp_worker, sp, sp, layout, overrides)[0]


def _image_tokens_per_slice(input_ids, image_token_id, sp):
    local = -(-input_ids.shape[-1] // sp)
    return [int(input_ids[..., r * local:(r + 1) * local].eq(image_token_id).sum()) for r in range(sp)], local


@pytest.mark.parametrize("sp, overrides", [
    (2, {}),  # 49 tokens padded to 50; sample 2's image block (tokens 21..28) straddles the two slices
    (4, {"num_attention_heads": 4, "num_key_value_heads": 1}),  # 52 = 4 x 13: 21..28 split at 26; rank 3 has no image; MQA
])
def test_isp_packed_equals_single_process(sp, overrides):
    patched, _ = patched_and_reference(**overrides)
    image_token = patched.config.image_token_id
    batch = pack_llava_samples(samples(patched.config), image_token)
    counts, local = _image_tokens_per_slice(batch["input_ids"][0], image_token, sp)
    ids = batch["input_ids"][0]
    assert any(ids[r * local - 1] == ids[r * local] == image_token for r in range(1, sp))  # an image split by ISP
    assert (0 in counts) == (sp == 4)
    logits = _packed_forward(patched, batch)
    loss = runtime.causal_lm_loss(logits, batch["labels"][0])
    loss.backward()
    isp_loss, isp_grads, isp_logits = _run_isp(sp, "packed", overrides)
    torch.testing.assert_close(torch.from_numpy(isp_logits)[0, :logits.shape[0]], logits, atol=ATOL, rtol=0)
    assert abs(isp_loss - loss.item()) < ATOL
    assert isp_grads.keys() == {name for name, p in patched.named_parameters() if p.grad is not None}
    for name, param in patched.named_parameters():
        if name in isp_grads:
            torch.testing.assert_close(torch.from_numpy(isp_grads[name]), param.grad, atol=ATOL, rtol=0, msg=name)


def test_isp_unpacked_rows_equal_single_process():
    """ISP without a pack (isp_flash_attn_func, batch of 2): each row's image block straddles the split."""
    patched, reference = patched_and_reference()
    batch = unpacked_rows(patched.config)
    counts, local = _image_tokens_per_slice(batch["input_ids"], patched.config.image_token_id, 2)
    assert all(batch["input_ids"][:, local - 1:local + 1].eq(patched.config.image_token_id).all(-1))
    logits = reference(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    loss = runtime.causal_lm_loss(logits, batch["labels"])
    loss.backward()
    isp_loss, isp_grads, isp_logits = _run_isp(2, "rows", {})
    torch.testing.assert_close(torch.from_numpy(isp_logits), logits, atol=ATOL, rtol=0)
    assert abs(isp_loss - loss.item()) < ATOL
    assert isp_grads.keys() == {name for name, p in reference.named_parameters() if p.grad is not None}
    for name, param in reference.named_parameters():
        if name in isp_grads:
            torch.testing.assert_close(torch.from_numpy(isp_grads[name]), param.grad, atol=ATOL, rtol=0, msg=name)


def test_patch_imports_only_the_runtime_api_and_renders_for_internevo(zoo_copy, tmp_path):
    text = pins.default_patch_path(zoo.resolve("llava")).read_text()
    for line in engines.ENGINE_IMPORTS["hfpatch"]:
        assert text.count(f"\n+{line}\n") == 1
    hfpatch_imports = [l for l in text.splitlines() if l.startswith("+") and "hfpatch" in l and "import" in l]
    assert len(hfpatch_imports) == 4
    runner = CliRunner()
    for args in (["sync", "llava"], ["apply", "llava", "--engine", "internevo"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    path = zoo_copy / "llava_hf/llava_1_5_7b_hf/modeling_llava.py"
    assert "hfpatch" not in path.read_text()
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
