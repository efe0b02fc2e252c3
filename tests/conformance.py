"""The zoo's conformance suite, driven by each manifest's ``[test]`` table (``tests/test_conformance.py`` runs it).

Every zoo row with a patch is compared with an independent reference, the UNPATCHED class named by
``[test] reference`` (transformers' or diffusers' own class, or ``"port"``: the committed pristine source of a
first-party port), holding the same float64 weights:

1. runtime off: the patched model is the unpatched one (forward, loss, gradients, ``generate`` with a cache);
2. packed: a pack of documents equals each document run alone (outputs, loss, every gradient);
3. leak guard: the same pack as one segment differs from alone, so check 2 can fail;
4. ISP: ``sp`` gloo ranks (``[test] isp``) equal one process: packs, unpacked rows and ``model(labels=...)``;
5. activation checkpointing, reentrant and not, with the pack published around the forward only: the gradients
   of a backward run after the pack is withdrawn equal those without checkpointing;
6. ``labels`` follow transformers' convention (the model shifts them; ``DataCollatorWithFlattening`` batches):
   packed with the runtime on == the unpatched model on the documents padded; runtime off == unpatched.

``[test] inputs`` says what a document is: ``"text"`` (token ids, any causal LM), ``"image-text"`` (LLaVA samples:
tokens with expanded image placeholders plus their images) or ``"latents"`` (Flux samples: text embeddings and
latents, one non-causal segment each). The gloo workers import this module too.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hfpatch import actions, modeling, runtime, zoo

ATOL = 1e-10
SHIFTED_ATOL = 1e-6  # RoPE tables are float32: positions shifted along a pack move logits by ~1e-8
FP32_ATOL = 1e-6  # transformers' own loss upcasts logits to float32 only
LEAK = 1e-6  # a leak across documents moves outputs by far more than the tolerances above
PACK_MULTIPLE = 8  # packs end in a padding segment up to a multiple of this, so sp=2 and 4 split them evenly
DEFAULT_DOCUMENTS = [[6, 14, 3, 19, 9]]
TEST_KEYS = {"reference", "inputs", "config", "init_std", "randomize_vectors", "documents", "float32_grads", "isp"}


@dataclass(frozen=True)
class Spec:
    """An entry's ``[test]`` table, validated."""

    entry: zoo.Entry
    reference: str  # "<module>.<Class>" or "port"
    inputs: str
    config: dict  # test_config overrides for every check
    init_std: float | None  # reset_parameters(std); None: its default
    randomize_vectors: bool  # draw norms and biases after reset_parameters, so that they take part
    documents: list  # document lengths of each text pack
    float32_grads: tuple  # parameters whose gradients upstream rounds to float32
    isp: list  # [{"sp": N, "config": {...}}]


def spec(name: str) -> Spec:
    entry = zoo.resolve(name)
    table = entry.test
    where = f"{entry.directory / zoo.MANIFEST} [test]"
    unknown = set(table) - TEST_KEYS
    if unknown:
        raise zoo.ZooError(f"{where}: unknown keys {sorted(unknown)}")
    if "reference" not in table:
        raise zoo.ZooError(f"{where}: missing 'reference' (the unpatched class to compare with)")
    if table.get("inputs", "text") not in INPUTS:
        raise zoo.ZooError(f"{where}: inputs must be one of {sorted(INPUTS)}, not {table['inputs']!r}")
    layouts = table.get("isp", [])
    if any(set(layout) - {"sp", "config"} or not isinstance(layout.get("sp"), int) for layout in layouts):
        raise zoo.ZooError(f"{where}: each isp layout is {{ sp = N, config = {{ ... }} }}")
    return Spec(entry, table["reference"], table.get("inputs", "text"), dict(table.get("config", {})),
                table.get("init_std"), bool(table.get("randomize_vectors", True)),
                list(table.get("documents", DEFAULT_DOCUMENTS)), tuple(table.get("float32_grads", ())), list(layouts))


def rows_with_tests() -> list[str]:
    """Every zoo row with a patch: each one's manifest carries a [test] table."""
    return [entry.name for entry in zoo.load_zoo() if entry.has_patch]


@functools.cache
def case(name: str):
    """The inputs adapter of a zoo row (its ``[test] inputs``)."""
    s = spec(name)
    return INPUTS[s.inputs](s)


def merged(base: dict, *overrides: dict) -> dict:
    """``base`` updated by ``overrides`` in order; nested tables (LLaVA's text_config) merge key by key."""
    out = copy.deepcopy(base)
    for override in overrides:
        for key, value in override.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def unpatched_port_class(entry: zoo.Entry) -> type:
    """The committed pristine source of a first-party port (``port/``), imported under a private name."""
    name = f"hfpatch_unpatched.{entry.name}.{entry.patch_target.removesuffix('.py')}"
    module = modeling.import_file(name, entry.directory / actions.PORT_DIR / entry.patch_target)
    return getattr(module, entry.model_class)


def reference_class(s: Spec) -> type:
    if s.reference == "port":
        return unpatched_port_class(s.entry)
    module, _, cls = s.reference.rpartition(".")
    return getattr(importlib.import_module(module), cls)


def documents(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def draw_vectors(model: torch.nn.Module, seed: int) -> None:
    """reset_parameters zeroes biases and leaves norms at one: draw them so they take part in every comparison."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.copy_(noise * 0.3 if key.endswith("bias") else 1 + 0.1 * noise)


def lm_logits(model, **inputs) -> torch.Tensor:
    """float64 logits: the base model, then the head (MambaForCausalLM would cast its logits to float32)."""
    return model.get_output_embeddings()(model.base_model(**inputs).last_hidden_state)


def uses_positions(model) -> bool:
    """Whether the model takes position_ids (RoPE decoders; not Mamba, not Flux)."""
    base = getattr(model, "base_model", None)
    return base is not None and "position_ids" in inspect.signature(type(base).forward).parameters


def grads(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model, expected, atol: float = ATOL, float32_grads=(), what: str = "") -> None:
    """Every gradient of ``model`` equals ``expected``'s (a model or a name -> tensor dict); both lack the same."""
    if not isinstance(expected, dict):
        expected = grads(expected)
    for name, param in model.named_parameters():
        want = expected.get(name)
        assert (param.grad is None) == (want is None), f"{what} {name}: a gradient on one side only"
        if want is not None:
            # upstream's .float() casts round these after a reduction that a pack or a rank split differently
            tol = max(atol, 1e-6 * want.abs().max().item()) if any(p in name for p in float32_grads) else atol
            torch.testing.assert_close(param.grad, want, atol=tol, rtol=0, msg=lambda m: f"{what} {name}: {m}")


def one_segment(pack: dict) -> dict:
    """The pack with its documents merged into one segment: what packing without cu_seqlens would do."""
    length = int(pack["cu_seqlens"][-1])
    return {**pack, "cu_seqlens": torch.tensor([0, length], dtype=torch.int32), "max_seqlen": length}


def padded_to(total: int) -> int:
    return -(-total // PACK_MULTIPLE) * PACK_MULTIPLE


def check_packed(adapter, patched, reference, monkeypatch) -> None:
    """Checks 2 and 3 on every pack of ``adapter``: packed == each document alone, restarting positions (and
    continuing ones where the model takes positions); the pack as one segment differs from alone."""
    positions = [None, "continue"] if uses_positions(patched) else [None]
    for pack in adapter.packs(patched):
        ref_out, ref_loss = adapter.alone(reference, pack)
        reference.zero_grad(set_to_none=True)
        ref_loss.backward()
        for variant in positions:
            position_ids = None if variant is None else torch.arange(pack["input_ids"].shape[-1])[None]
            atol = ATOL if variant is None else SHIFTED_ATOL
            patched.zero_grad(set_to_none=True)
            out = adapter.forward(patched, pack, position_ids)
            loss = adapter.loss(out, pack)
            torch.testing.assert_close(adapter.real(out, pack), ref_out, atol=atol, rtol=0)
            torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=0)
            loss.backward()
            assert_same_grads(patched, reference, atol, adapter.spec.float32_grads, what=f"{variant or 'restart'}:")
        with torch.no_grad():
            leaky = adapter.real(adapter.leaky_forward(patched, pack, monkeypatch), pack)
        assert (leaky - ref_out).abs().max() > LEAK


# ============================================================================ text


class Text:
    """Token documents through a causal LM (``[test] inputs = "text"``)."""

    has_labels = True
    rows_shape = (2, 24)  # unpacked ISP rows: split by sp=2 and 4, each slice >= Mamba's conv window

    def __init__(self, s: Spec):
        self.spec = s

    # -- models --------------------------------------------------------------------------------------

    def config_values(self, overrides: dict) -> dict:
        values = merged(self.spec.entry.test_config, self.spec.config, overrides)
        values.pop("model_type", None)
        return values

    def build_patched(self, overrides: dict, seed: int = 0):
        entry = self.spec.entry
        torch.manual_seed(seed)
        model = modeling.model_class(entry)(modeling.tiny_config(entry, **self.config_values(overrides))).double()
        model.reset_parameters(**({"std": self.spec.init_std} if self.spec.init_std else {}))
        if self.spec.randomize_vectors:
            draw_vectors(model, seed)
        return model

    def build(self, overrides: dict, seed: int = 0):
        """(patched, unpatched reference) with the same float64 weights."""
        patched = self.build_patched(overrides, seed)
        cls = reference_class(self.spec)
        reference = cls(cls.config_class(**self.config_values(overrides))).double()
        reference.load_state_dict(patched.state_dict())
        return patched, reference

    def enable_checkpointing(self, model, reentrant: bool) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})

    # -- 1. runtime off ------------------------------------------------------------------------------

    def check_no_runtime(self, patched, reference) -> None:
        """Left-padded batch (transformers' own mask path): logits, loss, grads, then greedy generate()."""
        ids = torch.randint(1, patched.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        self.compare_no_runtime(patched, reference, dict(input_ids=ids, attention_mask=mask, labels=ids))
        patched.eval(), reference.eval()
        gen_p = patched.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        gen_r = reference.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(gen_p, gen_r) and gen_p.shape[1] == 17

    @staticmethod
    def compare_no_runtime(patched, reference, inputs: dict) -> None:
        out_p, out_r = patched(**inputs), reference(**inputs)
        torch.testing.assert_close(out_p.logits, out_r.logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out_p.loss, out_r.loss, atol=ATOL, rtol=0)
        out_p.loss.backward()
        out_r.loss.backward()
        assert_same_grads(patched, reference)

    # -- 2./3. packs ---------------------------------------------------------------------------------

    def packs(self, model, sp: int = 1) -> list[dict]:
        assert PACK_MULTIPLE % sp == 0, f"packs of a multiple of {PACK_MULTIPLE} tokens do not split over {sp} ranks"
        out = []
        for index, lengths in enumerate(self.spec.documents):
            docs = documents(lengths, model.config.vocab_size, seed=index)
            row = runtime.build_packed_row(docs, seq_len=padded_to(sum(lengths)))
            out.append({**row.as_batch(), "docs": docs, "num_real": row.num_real_tokens})
        return out

    def forward(self, model, pack: dict, position_ids=None) -> torch.Tensor:
        """``[tokens, vocab]`` logits of the pack, published around the forward only."""
        position_ids = pack["position_ids"] if position_ids is None else position_ids
        with runtime.packed_batch(pack["cu_seqlens"], pack["max_seqlen"]):
            return lm_logits(model, input_ids=pack["input_ids"], position_ids=position_ids)[0]

    def loss(self, out: torch.Tensor, pack: dict, full: dict | None = None) -> torch.Tensor:
        """The runtime's token-weighted loss (labels already shifted); this rank's share under ISP."""
        return runtime.causal_lm_loss(out, pack["labels"][0])

    def real(self, out: torch.Tensor, pack: dict) -> torch.Tensor:
        return out[: pack["num_real"]]

    def alone(self, reference, pack: dict):
        """Each document alone through the unpatched model: concatenated logits and the token-mean loss."""
        logits, loss_sum = [], 0.0
        for doc in pack["docs"]:
            ids = torch.tensor([doc])
            out = lm_logits(reference, input_ids=ids)[0]
            logits.append(out)
            loss_sum = loss_sum + F.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
        return torch.cat(logits), loss_sum / sum(len(d) - 1 for d in pack["docs"])

    def leaky_forward(self, model, pack: dict, monkeypatch) -> torch.Tensor:
        return self.forward(model, one_segment(pack))

    def shard(self, pack: dict, rank: int, sp: int) -> dict:
        return runtime.shard_for_sequence_parallel(pack, rank, sp)

    # -- 6. labels -----------------------------------------------------------------------------------

    def flattened(self, model, pack: dict, sp: int = 1) -> dict:
        """The pack's documents as transformers' DataCollatorWithFlattening batch (labels unshifted, -100 at each
        document's first token) with its cu_seqlens, padded to a multiple of ``sp`` (-100 labels)."""
        from transformers import DataCollatorWithFlattening

        docs = pack["docs"]
        batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d} for d in docs])
        return self._with_pack(batch, [len(d) for d in docs], sp)

    @staticmethod
    def _with_pack(batch: dict, lengths: list[int], sp: int) -> dict:
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        batch = {**batch, "cu_seqlens": bounds, "max_seqlen": max(lengths), "token_mask": torch.ones_like(batch["input_ids"])}
        return runtime.pad_pack_to_multiple(batch, sp)

    def padded(self, model, pack: dict) -> dict:
        """The pack's documents one per row, right-padded, labels -100 on the padding: transformers' usual batch."""
        batch = runtime.pad_documents(pack["docs"])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}

    def model_loss(self, model, batch: dict, moe_router: bool = False):
        """``model(..., labels=...)`` of a flattened batch under its pack (MoE: with the router loss of the real
        tokens); the output."""
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels", "pixel_values") if k in batch}
        if moe_router:
            inputs.update(output_router_logits=True, attention_mask=batch["token_mask"])
        with runtime.packed_batch(batch["cu_seqlens"], batch["max_seqlen"]):
            return model(**inputs)

    def check_labels(self, patched, reference) -> None:
        pack = self.packs(patched)[0]
        batch = self.flattened(patched, pack)
        packed_loss = self.model_loss(patched, batch).loss
        expected = reference(**self.padded(patched, pack)).loss
        assert abs(packed_loss.item() - expected.item()) < FP32_ATOL, (packed_loss.item(), expected.item())
        # runtime off: the same flattened batch through both (transformers' own packed-position handling)
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "labels", "pixel_values") if k in batch}
        torch.testing.assert_close(patched(**inputs).loss, reference(**inputs).loss, atol=ATOL, rtol=0)

    # -- 4. unpacked rows under ISP -------------------------------------------------------------------

    def rows(self, model) -> dict:
        ids = torch.randint(1, model.config.vocab_size, self.rows_shape, generator=torch.Generator().manual_seed(7))
        shifted = torch.full_like(ids, -100)
        shifted[:, :-1] = ids[:, 1:]
        return {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids), "labels": ids,
                "shifted": shifted}

    def shard_rows(self, rows: dict, rank: int, sp: int) -> dict:
        n = rows["input_ids"].shape[1] // sp
        return {k: v[:, rank * n:(rank + 1) * n] if k != "pixel_values" else v for k, v in rows.items()}

    def rows_forward(self, model, rows: dict) -> torch.Tensor:
        return lm_logits(model, input_ids=rows["input_ids"], position_ids=rows["position_ids"])

    def rows_loss(self, out: torch.Tensor, rows: dict, full: dict) -> torch.Tensor:
        return runtime.causal_lm_loss(out, rows["shifted"])

    def rows_model_loss(self, model, rows: dict):
        inputs = {k: rows[k] for k in ("input_ids", "position_ids", "labels", "pixel_values") if k in rows}
        return model(**inputs).loss


# ============================================================================ image-text (LLaVA)


class ImageText(Text):
    """LLaVA samples: token ids whose image placeholders are expanded (one token per image feature, as
    transformers 5.x processors emit them) plus their images (``[test] inputs = "image-text"``)."""

    # (text before the image, number of images, text after) per sample: different text lengths
    LAYOUTS = [(3, 1, 9), (5, 2, 2), (0, 1, 14)]
    # unpacked ISP rows of one length (16) whose image blocks straddle the sp=2 split
    ROW_LAYOUTS = [(6, 1, 6), (2, 2, 6)]

    @staticmethod
    def samples(config, seed: int = 0, layouts=LAYOUTS):
        from hfpatch.runtime.image_text_packing import Sample

        generator = torch.Generator().manual_seed(seed)
        image_token, size = config.image_token_id, config.vision_config.image_size
        out = []
        for before, images, after in layouts:
            text = torch.randint(1, config.text_config.vocab_size, (before + after,), generator=generator)
            text[text == image_token] = 1
            ids = text[:before].tolist() + [image_token] * (config.image_seq_length * images) + text[before:].tolist()
            out.append(Sample(ids, torch.randn(images, 3, size, size, generator=generator, dtype=torch.float64)))
        return out

    @staticmethod
    def sample_labels(ids: torch.Tensor, config) -> torch.Tensor:
        """transformers' (unshifted) labels of LLaVA samples: the ids, -100 on image tokens."""
        return ids.masked_fill(ids == config.image_token_id, -100)

    def check_no_runtime(self, patched, reference) -> None:
        config = patched.config
        batch_samples = self.samples(config, seed=1, layouts=[(2, 1, 5), (4, 1, 1)])  # 11 and 9 tokens
        length = max(len(s.input_ids) for s in batch_samples)
        ids = torch.zeros(2, length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(batch_samples):  # left padding, exercising transformers' own mask path
            ids[row, length - len(sample.input_ids):] = torch.tensor(sample.input_ids)
            mask[row, length - len(sample.input_ids):] = 1
        pixels = torch.cat([s.pixel_values for s in batch_samples])
        labels = self.sample_labels(ids, config).masked_fill(mask == 0, -100)
        self.compare_no_runtime(patched, reference,
                                dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels))
        assert patched.config.text_config._attn_implementation == "sdpa"  # no pack, no ISP: transformers' own path
        prompt, first = torch.tensor([batch_samples[0].input_ids]), batch_samples[0].pixel_values
        gen_p = patched.generate(input_ids=prompt, pixel_values=first, max_new_tokens=6, do_sample=False)
        gen_r = reference.generate(input_ids=prompt, pixel_values=first, max_new_tokens=6, do_sample=False)
        assert torch.equal(gen_p, gen_r) and gen_p.shape[1] == prompt.shape[1] + 6

    def packs(self, model, sp: int = 1) -> list[dict]:
        from hfpatch.runtime.image_text_packing import pack_llava_samples

        samples = self.samples(model.config)
        total = sum(len(s.input_ids) for s in samples)
        pack = pack_llava_samples(samples, model.config.image_token_id, seq_len=padded_to(total))
        return [{**pack, "samples": samples, "num_real": total}]

    def forward(self, model, pack: dict, position_ids=None) -> torch.Tensor:
        position_ids = pack["position_ids"] if position_ids is None else position_ids
        with runtime.packed_batch(pack["cu_seqlens"], pack["max_seqlen"]):
            return model(input_ids=pack["input_ids"], pixel_values=pack["pixel_values"],
                         position_ids=position_ids).logits[0]

    def alone(self, reference, pack: dict):
        """Each sample alone through the unpatched model: logits and the token-mean loss (no loss on image
        tokens; summed in float64 here, transformers' own loss upcasts to float32 only)."""
        logits, loss_sum, targets = [], 0.0, 0
        for sample in pack["samples"]:
            ids = torch.tensor([sample.input_ids])
            labels = self.sample_labels(ids, reference.config)[0, 1:]
            out = reference(input_ids=ids, pixel_values=sample.pixel_values).logits[0]
            logits.append(out)
            loss_sum = loss_sum + F.cross_entropy(out[:-1], labels, reduction="sum")
            targets += int((labels != -100).sum())
        return torch.cat(logits), loss_sum / targets

    def flattened(self, model, pack: dict, sp: int = 1) -> dict:
        """The samples flattened as DataCollatorWithFlattening lays them out (image tokens -100 too), images in order."""
        ids = [torch.tensor(s.input_ids) for s in pack["samples"]]
        labels = [torch.cat([torch.tensor([-100]), self.sample_labels(t, model.config)[1:]]) for t in ids]
        batch = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
                 "position_ids": torch.cat([torch.arange(len(t)) for t in ids])[None],
                 "pixel_values": torch.cat([s.pixel_values for s in pack["samples"]])}
        return self._with_pack(batch, [len(t) for t in ids], sp)

    def padded(self, model, pack: dict) -> dict:
        batch = runtime.pad_documents([s.input_ids for s in pack["samples"]])
        labels = self.sample_labels(batch["input_ids"], model.config).masked_fill(batch["attention_mask"] == 0, -100)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
                "pixel_values": torch.cat([s.pixel_values for s in pack["samples"]])}

    def rows(self, model) -> dict:
        samples = self.samples(model.config, seed=2, layouts=self.ROW_LAYOUTS)
        ids = torch.tensor([s.input_ids for s in samples])
        labels = self.sample_labels(ids, model.config)
        shifted = torch.full_like(ids, -100)
        shifted[:, :-1] = labels[:, 1:]
        return {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids), "labels": labels,
                "shifted": shifted, "pixel_values": torch.cat([s.pixel_values for s in samples])}

    def rows_forward(self, model, rows: dict) -> torch.Tensor:
        return model(input_ids=rows["input_ids"], position_ids=rows["position_ids"],
                     pixel_values=rows["pixel_values"]).logits


# ============================================================================ latents (Flux)


class Latents:
    """Flux samples: text embeddings and (patchified) latents at different resolutions, each sample one
    non-causal segment, text first (``[test] inputs = "latents"``; huggingface_model/flux/README.md)."""

    has_labels = False  # flow matching: no labels
    # (latent height, latent width, text tokens) of the packed samples: 16 + 5 + 12 + 4 = 37 tokens
    SAMPLES = [(4, 4, 5), (2, 6, 4)]
    ROW_SHAPE = (4, 4, 4)  # unpacked rows: two samples of one shape, [text; image] = 20 tokens a row

    def __init__(self, s: Spec):
        self.spec = s

    def build_patched(self, overrides: dict, seed: int = 0):
        torch.manual_seed(seed)  # diffusers' own random init: non-zero biases and AdaLN gates carry signal
        config = merged(self.spec.entry.test_config, self.spec.config, overrides)
        return modeling.model_class(self.spec.entry).from_config(config).double()

    def build(self, overrides: dict, seed: int = 0):
        patched = self.build_patched(overrides, seed)
        config = merged(self.spec.entry.test_config, self.spec.config, overrides)
        reference = reference_class(self.spec).from_config(config).double()
        reference.load_state_dict(patched.state_dict())
        return patched, reference

    def enable_checkpointing(self, model, reentrant: bool) -> None:
        from torch.utils.checkpoint import checkpoint

        model.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=reentrant))

    @staticmethod
    def samples(config, shapes, seed: int = 0) -> list[dict]:
        """Synthetic rectified-flow training samples: x_t = (1 - t) x0 + t noise, target velocity noise - x0."""
        from hfpatch.runtime.latent_packing import image_ids, noised_sample

        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        out = []
        for height, width, text in shapes:
            x0, noise = randn(height * width, config.in_channels), randn(height * width, config.in_channels)
            t = torch.rand((), generator=generator, dtype=torch.float64)
            out.append(noised_sample(x0, noise, t, randn(text, config.joint_attention_dim),
                                     randn(config.pooled_projection_dim), image_ids(height, width)))
        return out

    @staticmethod
    def batch_inputs(samples: list[dict]) -> dict:
        """Upstream's own (unpacked) layout: samples of one shape stacked in a batch."""
        from hfpatch.runtime.latent_packing import batch_inputs

        return batch_inputs(samples)

    def check_no_runtime(self, patched, reference) -> None:
        samples = self.samples(patched.config, [self.ROW_SHAPE] * 2)
        inputs = self.batch_inputs(samples)
        target = torch.stack([s["target"] for s in samples])
        out_p, out_r = patched(**inputs).sample, reference(**inputs).sample
        torch.testing.assert_close(out_p, out_r, atol=0, rtol=0)  # the same code path: bit-identical
        ((out_p - target) ** 2).mean().backward()
        ((out_r - target) ** 2).mean().backward()
        assert_same_grads(patched, reference, atol=0)

    def packs(self, model, sp: int = 1) -> list[dict]:
        from hfpatch.runtime.latent_packing import pack_samples

        samples = self.samples(model.config, self.SAMPLES)
        return [{**pack_samples(samples, multiple=sp), "samples": samples}]

    def forward(self, model, pack: dict, position_ids=None) -> torch.Tensor:
        """``[image tokens, channels]`` velocities of the pack (this rank's under ISP)."""
        from hfpatch.runtime.latent_packing import forward_packed

        return forward_packed(model, pack)[0]

    def loss(self, out: torch.Tensor, pack: dict, full: dict | None = None) -> torch.Tensor:
        from hfpatch.runtime.latent_packing import flow_matching_loss

        tokens = int((full or pack)["loss_mask"].sum())  # the whole pack's, so ISP shares add up
        return flow_matching_loss(out[None], pack["target"], pack["loss_mask"], tokens)

    def real(self, out: torch.Tensor, pack: dict) -> torch.Tensor:
        return out[pack["loss_mask"][0]]

    def alone(self, reference, pack: dict):
        outs, err = [], 0.0
        for s in pack["samples"]:
            out = reference(**self.batch_inputs([s])).sample[0]
            outs.append(out)
            err = err + ((out - s["target"]) ** 2).sum()
        return torch.cat(outs), err / (int(pack["loss_mask"].sum()) * reference.config.in_channels)

    def leaky_forward(self, model, pack: dict, monkeypatch) -> torch.Tensor:
        """Flux's packed forward checks one txt_seqlens per segment, so merge the segments at the kernel."""
        module = modeling.load_patched_module(self.spec.entry)
        real = module.isp_flash_attn_varlen_func

        def whole_pack(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
            merged_pack = one_segment({"cu_seqlens": cu_q})
            return real(q, k, v, merged_pack["cu_seqlens"], merged_pack["cu_seqlens"], merged_pack["max_seqlen"],
                        merged_pack["max_seqlen"], **kwargs)

        monkeypatch.setattr(module, "isp_flash_attn_varlen_func", whole_pack)
        return self.forward(model, pack)

    def shard(self, pack: dict, rank: int, sp: int) -> dict:
        from hfpatch.runtime.latent_packing import shard_pack

        return shard_pack(pack, rank, sp)

    def rows(self, model) -> dict:
        return self.batch_inputs(self.samples(model.config, [self.ROW_SHAPE] * 2, seed=1))

    def shard_rows(self, rows: dict, rank: int, sp: int) -> dict:
        """This rank's contiguous slice of every row's joint [text; image] sequence."""
        text, image = rows["txt_ids"].shape[0], rows["img_ids"].shape[0]
        lo, hi = rank * (text + image) // sp, (rank + 1) * (text + image) // sp
        t0, t1, i0, i1 = min(lo, text), min(hi, text), max(lo, text) - text, max(hi, text) - text
        return {**rows, "encoder_hidden_states": rows["encoder_hidden_states"][:, t0:t1], "txt_ids": rows["txt_ids"][t0:t1],
                "hidden_states": rows["hidden_states"][:, i0:i1], "img_ids": rows["img_ids"][i0:i1]}

    def rows_forward(self, model, rows: dict) -> torch.Tensor:
        return model(**rows).sample

    def rows_loss(self, out: torch.Tensor, rows: dict, full: dict) -> torch.Tensor:
        return (out**2).sum() / full["hidden_states"].numel()  # the full rows': ISP shares add up

    def rows_model_loss(self, model, rows: dict):
        return None


INPUTS = {"text": Text, "image-text": ImageText, "latents": Latents}


# ============================================================================ 4. ISP workers


def _gather(tensor: torch.Tensor, dim: int):
    """The ranks' pieces concatenated along ``dim`` (Flux's ranks hold different numbers of image tokens)."""
    parts = [None] * runtime.gpc.get_world_size(runtime.ParallelMode.TENSOR)
    torch.distributed.all_gather_object(parts, tensor.detach(), group=runtime.gpc.get_group(runtime.ParallelMode.TENSOR))
    return torch.cat(parts, dim=dim).numpy()


def _summed_grads(model) -> dict:
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:  # LLaVA: CLIP's last layer (it reads the second-to-last)
            continue
        torch.distributed.all_reduce(param.grad)  # ISP ranks hold partial sums of the replicated weights' grads
        out[name] = param.grad.numpy().copy()  # plain pickle: shared-memory tensors die with the worker
    return out


def isp_results(adapter, model, sp: int) -> dict:
    """One ISP rank's side of check 4 (every rank runs it): packs, labels and unpacked rows."""
    rank = runtime.gpc.get_local_rank(runtime.ParallelMode.TENSOR)
    out = {"packs": []}
    for pack in adapter.packs(model, sp):
        local = adapter.shard(pack, rank, sp)
        model.zero_grad(set_to_none=True)
        result = adapter.forward(model, local)
        loss = adapter.loss(result, local, pack)
        loss.backward()
        out["packs"].append({"out": _gather(result, 0), "loss": runtime.global_loss(loss), "grads": _summed_grads(model)})
    if adapter.has_labels:
        batch = adapter.flattened(model, adapter.packs(model, sp)[0], sp)
        local = runtime.shard_for_sequence_parallel(batch, rank, sp)  # pixel_values: every rank gets all
        moe = hasattr(model.config, "router_aux_loss_coef")
        with torch.no_grad():
            result = adapter.model_loss(model, local, moe_router=moe)
        out["labels"] = {"loss": runtime.global_loss(result.loss),
                         "aux": runtime.global_loss(result.aux_loss) if moe else None}
    full_rows = adapter.rows(model)
    rows = adapter.shard_rows(full_rows, rank, sp)
    model.zero_grad(set_to_none=True)
    result = adapter.rows_forward(model, rows)
    loss = adapter.rows_loss(result, rows, full_rows)
    loss.backward()
    out["rows"] = {"out": _gather(result, 1), "loss": runtime.global_loss(loss), "grads": _summed_grads(model)}
    if adapter.has_labels:
        with torch.no_grad():
            out["rows"]["model_loss"] = runtime.global_loss(adapter.rows_model_loss(model, rows))
    return out


def isp_worker(rank: int, world: int, cases: list) -> dict | None:
    """One gloo rank of an ISP group of ``world``: every (zoo row, isp layout) case in turn. A case that raises on
    every rank reports its traceback instead of failing the others."""
    torch.set_num_threads(1)
    runtime.initialize(sequence_parallel=world, backend="gloo")
    try:
        results = {}
        for name, index in cases:
            adapter = case(name)
            try:
                model = adapter.build_patched(adapter.spec.isp[index].get("config", {}))
                results[(name, index)] = isp_results(adapter, model, world)
            except Exception:
                results[(name, index)] = {"error": traceback.format_exc()}
        return results if rank == 0 else None
    finally:
        runtime.destroy()
