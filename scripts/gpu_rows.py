#!/usr/bin/env python
"""Every zoo row proven on one GPU, in one process; one JSON per stage in --out.

    python scripts/gpu_rows.py --out docs/bench/rows                       # a GPU: bf16, auto attention backend
    python scripts/gpu_rows.py --device cpu --out /tmp/rows --steps 3      # CPU smoke: float32, reference attention
    python scripts/gpu_rows_report.py /tmp/rows --out docs/gpu_rows.md     # the table

Each row is a small model of its real architecture (head dim 128, the real GQA ratio, MoE routing, Qwen2's
sliding window; 4 layers; the embedded tokenizer's vocab): the manifest's [test_config] plus the row's
``--set model.KEY=VALUE`` settings (``ROWS``; --size gpu, the default on a GPU), or the manifest's config with
only the row's features (--size tiny, the default on a CPU).

Stages (--stages), each written to --out/STAGE.json after every row, so a run cut short keeps what it measured:
  numerics  packed == each document alone, logits (LLaVA: with images; Flux: velocities), loss (Mixtral: with
            the router aux loss) and every gradient, in --dtype with the auto attention backend. Rule: packed
            and alone runs are each compared with a float32 run (float64 for --dtype float32) of the documents
            alone; packed passes when its relative error is at most 2x the alone run's plus a floor (FLOOR). A
            guard runs the pack with documents not kept apart and must fail that rule.
  train     `hfpatch train ROW` through hfpatch.train.run_training for --steps steps: loss, real tokens/s, MFU,
            peak memory; the language rows also --padded (the same documents one per row).
  mamba     packed Mamba (the patched parallel scan) against transformers' unpatched MambaForCausalLM (its
            torch path) on padded batches of the same documents: tokens/s and peak memory; and one MambaMixer's
            activations (bytes saved for backward; on a GPU also peak memory) at 1, 2 and 4 rows of tokens.
  two_gpus  (--two-gpus) every row's packed run again with --nproc 2 --sp 2 (one torchrun for all rows), its
            loss curve against the one-GPU curve; on a GPU it needs 2 GPUs ("not run: 1 GPU" otherwise), on a
            CPU it runs two gloo processes.
Each row runs isolated: an error or a row past --row-cap seconds is recorded and the next row runs;
--deadline bounds the whole run. Exit status 1 if a numerics check failed or a row errored.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hfpatch import modeling, runtime  # noqa: E402
from hfpatch.runtime import image_text_packing, latent_packing  # noqa: E402
from hfpatch.environment import attention_summary, inspect_environment  # noqa: E402
from hfpatch.train import diffusion, multimodal, resolve_config, run_training  # noqa: E402
from hfpatch.train.batches import packed_micro_batch, padded_micro_batch  # noqa: E402
from hfpatch.train.build import build_model  # noqa: E402
from hfpatch.train.data import load_dataset  # noqa: E402
from hfpatch.train.metrics import read_metrics  # noqa: E402
from hfpatch.train.tokenizer import DEFAULT_VOCAB_SIZE  # noqa: E402
from hfpatch.train.families import LANGUAGE_FAMILIES, family_of, model_config, resolve_entry  # noqa: E402

STAGES = ("numerics", "train", "mamba", "two_gpus")
SEED = 0
# packed error <= 2 x the alone run's error + FLOOR: a quarter of bf16's rounding step (2^-8), for a quantity the
# low-precision alone run happens to get almost exact; float32 (the CPU run) is compared with float64
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float32: 1e-6}
# one-GPU vs two-GPU loss curves: largest relative difference of a step's loss
CURVE_RTOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def decoder(heads: int, kv_heads: int | None, intermediate: int, layers: int = 4) -> tuple[str, ...]:
    """A decoder with the real model's head dim (128) and query/key-value head ratio, ``layers`` deep."""
    kv = () if kv_heads is None else (f"model.num_key_value_heads={kv_heads}",)
    return (f"model.hidden_size={heads * 128}", f"model.num_attention_heads={heads}", *kv,
            f"model.intermediate_size={intermediate}", f"model.num_hidden_layers={layers}")


@dataclass(frozen=True)
class Row:
    name: str
    features: tuple[str, ...] = ()  # settings on every device: the architecture feature under test
    gpu: tuple[str, ...] = ()  # settings on a GPU: a small model of the real one's shape


ROWS = (
    Row("llama2", gpu=decoder(4, 4, 1376)),  # Llama-2-7B: 32 heads (MHA), MLP 11008/4096
    Row("yi", gpu=decoder(8, 1, 2752)),  # Yi-6B: 32 query / 4 key-value heads (GQA 8:1)
    Row("internlm1", gpu=decoder(4, 4, 1376)),  # InternLM-7B: MHA, q/k/v/o biases (its manifest config)
    Row("internlm2", gpu=decoder(4, 1, 1792)),  # InternLM2-7B: 32 / 8 heads (GQA 4:1), MLP 14336/4096
    Row("baichuan2", gpu=decoder(4, None, 1376)),  # Baichuan2-7B: MHA, NormHead
    # Qwen2-7B: 28 / 4 heads (GQA 7:1), MLP 18944/3584; its sliding window on the upper layers, narrower than
    # the longest documents
    Row("qwen2", features=("model.use_sliding_window=True", "model.sliding_window=8", "model.max_window_layers=1"),
        gpu=(*decoder(7, 1, 4736), "model.sliding_window=256", "model.max_window_layers=2")),
    # Mixtral-8x7B: 32 / 8 heads (GQA 4:1), 8 experts top-2, its router aux loss (coef 0.02) in the loss
    Row("mixtral", features=("model.output_router_logits=True", "model.router_aux_loss_coef=0.02"),
        gpu=(*decoder(4, 1, 1792), "model.num_local_experts=8", "model.num_experts_per_tok=2")),
    # LLaVA-1.5: a Llama-2 language model, a CLIP tower with head dim 64 (ViT-L/14's), 64 image tokens
    Row("llava", gpu=(
        "model.text_config={'hidden_size': 512, 'num_attention_heads': 4, 'num_key_value_heads': 4, "
        "'intermediate_size': 1376, 'num_hidden_layers': 4}",
        "model.vision_config={'model_type': 'clip_vision_model', 'hidden_size': 256, 'intermediate_size': 1024, "
        "'num_hidden_layers': 2, 'num_attention_heads': 4, 'image_size': 112, 'patch_size': 14, 'projection_dim': 256}",
        "model.image_seq_length=64")),
    # mamba-130m's width, state and conv; 4 layers
    Row("mamba", gpu=("model.hidden_size=768", "model.state_size=16", "model.expand=2", "model.conv_kernel=4",
                      "model.num_hidden_layers=4")),
    # FLUX.1: head dim 128 with its rotary split (16, 56, 56), 64 latent channels, double then single blocks
    Row("flux", gpu=("model.attention_head_dim=128", "model.num_attention_heads=4", "model.num_layers=2",
                     "model.num_single_layers=4", "model.in_channels=64", "model.joint_attention_dim=512",
                     "model.pooled_projection_dim=256", "model.axes_dims_rope=[16, 56, 56]")),
)
ROW_NAMES = tuple(row.name for row in ROWS)

# numerics inputs (--size gpu, tiny): document lengths of the language rows (the longest wider than Qwen2's window),
# LLaVA samples, Flux samples (latent height, width, text tokens)
DOCUMENTS = {"gpu": (517, 3, 1024, 129, 61, 300), "tiny": (7, 13, 3, 20, 9)}
LLAVA_SAMPLES = {"gpu": 6, "tiny": 3}
FLUX_SHAPES = {"gpu": ((32, 32, 77), (16, 24, 40), (8, 8, 12)), "tiny": ((4, 4, 5), (2, 6, 4), (3, 3, 3))}
PACK_MULTIPLE = {"gpu": 64, "tiny": 8}  # packs end in a padding segment, as the trainer's do
# Flux's per-sample runs take diffusers' own attention (torch SDPA) without cuDNN's kernel: on the H200 (torch
# 2.11, bf16) SDPA picked it for these samples and its gradients were NaN (an earlier run of this harness ended in
# an illegal memory access); flash / memory-efficient SDPA give finite gradients within bf16 of the float32 reference.
FLUX_REFERENCE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# -- isolation ------------------------------------------------------------------------------


class TimeCap(BaseException):
    """A unit of work ran past its cap (a BaseException, so the code it interrupts cannot swallow it)."""


@contextlib.contextmanager
def time_cap(seconds: float):
    def expire(signum, frame):
        raise TimeCap(f"stopped by its {seconds:.0f} s cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """The run's deadline, shared by its units; ``reserved`` seconds are kept for a later stage."""

    def __init__(self, seconds: float, row_cap: float) -> None:
        self.end = time.monotonic() + seconds
        self.row_cap = row_cap
        self.reserved = 0.0

    def left(self) -> float:
        return self.end - time.monotonic() - self.reserved

    def cap(self, scale: float = 1.0) -> float:
        return min(self.row_cap * scale, self.left())


MIN_UNIT_S = 5.0  # a unit with less time than this left is not started
MAMBA_RESERVE_S = 45.0  # kept for the Mamba stage while the rows' stages run


def release_memory() -> None:
    """What a failed or finished unit may leave behind: the runtime, a published pack, cached blocks."""
    if runtime.gpc.is_initialized:
        runtime.destroy()
    runtime.clear_packed_batch()
    if "torch._dynamo" in sys.modules:  # --compile: each run's graphs, and dynamo's recompile budget, start afresh
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def isolated(budget: Budget, work: Callable[[], dict], scale: float = 1.0) -> dict:
    """``work()``'s result, or what stopped it (an error, its cap, the deadline); never raises."""
    if budget.left() < MIN_UNIT_S:
        return {"status": "not run: deadline"}
    started = time.perf_counter()
    try:
        with time_cap(budget.cap(scale)):
            result = {"status": "ok", **work()}
    except TimeCap as exc:
        result = {"status": str(exc)}
    except Exception as exc:  # a row's failure is recorded, never fatal
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                  "traceback": traceback.format_exc().splitlines()[-12:]}
        print(f"   {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr, flush=True)
    finally:
        release_memory()
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# -- settings --------------------------------------------------------------------------------


def model_settings(row: Row, size: str) -> list[str]:
    return [*row.features, *(row.gpu if size == "gpu" else ())]


def train_settings(row: Row, args, run_dir: Path, packed: bool = True, sp: int = 1) -> list[str]:
    """The run as ``--set`` assignments (``resolve_config``'s and the CLI's)."""
    return [
        *model_settings(row, args.size), f"total_steps={args.steps}", f"data.seq_len={args.seq_len}",
        f"data.micro_num={args.micro_num}", f"seed={SEED}", f"data.use_packed_dataset={packed}",
        f"model.compile={args.compile}", f"parallel.tensor.size={sp}", f"out={run_dir}", "resume=never",
        f"log_every={max(1, args.steps // 5)}", "data.overflow=split",
        *([f"data.train_folder={args.data}"] if args.data and resolve_entry(row.name).family in LANGUAGE_FAMILIES else []),
    ]


def command_line(row: str, settings: list[str], nproc: int = 1) -> str:
    launch = f" --nproc {nproc}" if nproc > 1 else ""
    return f"hfpatch train {row}{launch} " + " ".join(f"--set {shlex.quote(s)}" for s in settings)


# -- stage 1: numerics ------------------------------------------------------------------------


@dataclass
class Output:
    values: torch.Tensor  # the compared output of the real tokens (logits, Flux's velocities)
    loss: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other compared scalars (Mixtral's aux loss)


@dataclass
class Case:
    """A row's numerics inputs: the packed run, each document alone, and the guard (documents not kept apart)."""

    documents: list[int]  # lengths
    packed: Callable[[torch.nn.Module], Output]
    alone: Callable[[torch.nn.Module], Output]
    leaky: Callable[[torch.nn.Module], Output]
    windows: dict[str, tuple[int, int]]  # attention calls -> window, for the backend record


def _dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _one_segment(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, int(cu_seqlens[-1])], dtype=torch.int32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def language_case(entry, config, device: torch.device, args) -> Case:
    """Random documents packed in one row; Mixtral adds its aux loss over the pack's real tokens, against
    transformers' load_balancing_loss_func over the documents run alone."""
    lengths = list(DOCUMENTS[args.size])
    generator = torch.Generator().manual_seed(SEED)
    docs = [torch.randint(1, config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    row = runtime.build_packed_row(docs, seq_len=_round_up(sum(lengths), PACK_MULTIPLE[args.size]))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in row.as_batch().items()}
    moe, ssm = entry.family == "decoder-moe", entry.family == "state-space"
    coef = float(getattr(config, "router_aux_loss_coef", 0.0)) if moe else 0.0
    real, targets = row.num_real_tokens, sum(n - 1 for n in lengths)

    def packed(model, cu_seqlens=None):
        kwargs = {} if ssm else {"position_ids": batch["position_ids"]}
        if moe:
            kwargs.update(attention_mask=batch["token_mask"], output_router_logits=True)
        cu = batch["cu_seqlens"] if cu_seqlens is None else cu_seqlens.to(device)
        with runtime.packed_batch(cu):
            out = model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
        loss = runtime.causal_lm_loss(out.logits.float(), batch["labels"])
        extra = {}
        if moe:
            extra["aux_loss"] = out.aux_loss.float()
            loss = loss + coef * out.aux_loss
        return Output(out.logits[0, :real].float(), loss, extra)

    def alone(model):
        logits, loss_sum, routers = [], 0.0, []
        for doc in docs:
            ids = torch.tensor([doc], device=device)
            out = model(input_ids=ids, use_cache=False, **({"output_router_logits": True} if moe else {}))
            logits.append(out.logits[0].float())
            loss_sum = loss_sum + F.cross_entropy(logits[-1][:-1], ids[0, 1:], reduction="sum")
            if moe:
                routers.append(out.router_logits)
        loss, extra = loss_sum / targets, {}
        if moe:
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            per_layer = tuple(torch.cat([r[layer] for r in routers]) for layer in range(len(routers[0])))
            aux = load_balancing_loss_func(per_layer, config.num_local_experts, config.num_experts_per_tok)
            extra["aux_loss"] = aux.float()
            loss = loss + coef * aux
        return Output(torch.cat(logits), loss, extra)

    windows = {} if ssm else {"causal": (-1, 0)}
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        windows[f"sliding window {config.sliding_window}"] = (config.sliding_window - 1, 0)
    return Case(lengths, packed, alone, lambda model: packed(model, _one_segment(row.cu_seqlens)), windows)


def llava_case(entry, config, device: torch.device, args) -> Case:
    """The trainer's synthetic captioned images (one or two a sample), packed as the trainer packs them."""
    vocab = multimodal.WordVocab()
    image_token = config.image_token_id
    samples = multimodal.synthetic_samples(
        vocab, image_token_id=image_token, image_seq_length=config.image_seq_length,
        image_size=config.vision_config.image_size, count=LLAVA_SAMPLES[args.size], seed=SEED)
    lengths = [len(s.input_ids) for s in samples]
    batch = image_text_packing.pack_llava_samples(samples, image_token, seq_len=_round_up(sum(lengths), PACK_MULTIPLE[args.size]),
                                          pad_id=vocab.pad_id)
    real = sum(lengths)

    def packed(model, cu_seqlens=None):
        cu = batch["cu_seqlens"] if cu_seqlens is None else cu_seqlens
        with runtime.packed_batch(cu.to(device)):
            logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                           pixel_values=batch["pixel_values"].to(device, _dtype_of(model)), use_cache=False).logits
        return Output(logits[0, :real].float(), runtime.causal_lm_loss(logits.float(), batch["labels"].to(device)))

    def alone(model):
        logits, loss_sum, targets = [], 0.0, 0
        for sample in samples:
            ids = torch.tensor([sample.input_ids], device=device)
            out = model(input_ids=ids, pixel_values=sample.pixel_values.to(device, _dtype_of(model)), use_cache=False)
            logits.append(out.logits[0].float())
            labels = ids[0, 1:].masked_fill(ids[0, 1:] == image_token, runtime.IGNORE_INDEX)  # no loss on image tokens
            loss_sum = loss_sum + F.cross_entropy(logits[-1][:-1], labels, reduction="sum")
            targets += int((labels != runtime.IGNORE_INDEX).sum())
        return Output(torch.cat(logits), loss_sum / targets)

    leaky = lambda model: packed(model, _one_segment(batch["cu_seqlens"]))  # noqa: E731
    return Case(lengths, packed, alone, leaky, {"causal": (-1, 0)})


def flux_case(entry, config, device: torch.device, args) -> Case:
    """Random latents at several resolutions with text of several lengths, noised as the trainer noises them."""
    generator = torch.Generator().manual_seed(SEED)
    channels = config["in_channels"]
    latents = [diffusion.Latent(
        x0=torch.randn(h * w, channels, generator=generator), height=h, width=w,
        encoder_hidden_states=torch.randn(text, config["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(config["pooled_projection_dim"], generator=generator),
    ) for h, w, text in FLUX_SHAPES[args.size]]
    samples = diffusion.noised_samples(latents, noise_seed=SEED + 1)
    pack = latent_packing.pack_samples(samples, multiple=PACK_MULTIPLE[args.size])
    mask = pack["loss_mask"].to(device)
    tokens = int(mask.sum())

    def packed(model):
        pred = latent_packing.forward_packed(model, diffusion.move_inputs(pack, device, _dtype_of(model))).float()
        loss = latent_packing.flow_matching_loss(pred, pack["target"].to(device), mask, tokens)
        return Output(pred[mask], loss)

    def alone(model):
        outs, err = [], 0.0
        for sample in samples:
            inputs = diffusion.move_inputs(latent_packing.batch_inputs([sample]), device, _dtype_of(model))
            with sdpa_kernel(FLUX_REFERENCE_SDPA):  # the upstream path's torch SDPA
                outs.append(model(**inputs).sample[0].float())
            err = err + ((outs[-1] - sample["target"].to(device)) ** 2).sum()
        return Output(torch.cat(outs), err / (tokens * channels))

    def leaky(model):
        """Attention over the whole pack: Flux's layout needs its per-sample segments, so the kernel call is
        what gets one segment."""
        module = modeling.load_patched_module(entry)
        real = module.isp_flash_attn_varlen_func

        def one_segment(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
            whole = _one_segment(cu_q).to(cu_q.device)
            return real(q, k, v, whole, whole, int(cu_q[-1]), int(cu_q[-1]), **kwargs)

        module.isp_flash_attn_varlen_func = one_segment
        try:
            return packed(model)
        finally:
            module.isp_flash_attn_varlen_func = real

    lengths = [h * w + text for h, w, text in FLUX_SHAPES[args.size]]
    return Case(lengths, packed, alone, leaky, {"non-causal": (-1, -1)})


def build_case(entry, config, device, args) -> Case:
    if entry.family in LANGUAGE_FAMILIES:
        return language_case(entry, config, device, args)
    return llava_case(entry, config, device, args) if entry.family == "vision-language" else flux_case(entry, config, device, args)


def forward_backward(model: torch.nn.Module, run: Callable[[torch.nn.Module], Output]) -> tuple[Output, dict]:
    model.zero_grad(set_to_none=True)
    out = run(model)
    out.loss.backward()
    grads = {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return Output(out.values.detach(), out.loss.detach(), {k: v.detach() for k, v in out.extra.items()}), grads


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest error relative to the largest value: what one wrong token shows in (a Mamba state leaking a
    few tokens past a document start moves the L2 error of the whole pack too little)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def grads_error(got: dict, ref: dict) -> tuple[float, dict]:
    """Relative error of all gradients together, and the tensor with the largest relative error (information)."""
    if set(got) != set(ref):
        raise RuntimeError(f"different parameters got gradients: {sorted(set(got) ^ set(ref))[:5]}")
    diff = sum(((got[n].double() - r.double()).norm() ** 2).item() for n, r in ref.items())
    norm = sum((r.double().norm() ** 2).item() for r in ref.values())
    worst = max(ref, key=lambda n: relative_error(got[n], ref[n]))
    return math.sqrt(diff / max(norm, 1e-300)), {"name": worst, "error": relative_error(got[worst], ref[worst])}


def errors_against(out: Output, grads: dict, golden: Output, golden_grads: dict) -> dict:
    errors = {"output": relative_error(out.values, golden.values), "output_max": max_error(out.values, golden.values),
              "loss": relative_error(out.loss, golden.loss)}
    errors.update({k: relative_error(v, golden.extra[k]) for k, v in out.extra.items()})
    errors["grads"], errors["grads_worst_tensor"] = grads_error(grads, golden_grads)
    return errors


def vary_init(model: torch.nn.Module, entry) -> None:
    """The trainer's init leaves biases at zero and norm weights at one, and Mixtral's router near uniform (its aux
    loss then equals top_k whatever the routing); drawn at random instead (as the CPU equivalence tests do), a bias,
    a norm or a routing statistic that the packed path mishandles shows. Mamba's time-step bias keeps its init."""
    generator = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator).to(param.device, param.dtype)
            if name.endswith("mlp.gate.weight") and entry.family == "decoder-moe":
                param.copy_(noise / param.shape[-1] ** 0.5)  # router logits of order one
            elif param.ndim == 1 and not name.endswith("dt_proj.bias"):
                param.copy_(noise * 0.1 if name.endswith("bias") else 1 + noise * 0.1)


def reference_config(entry, config):
    """The reference run's config: Mixtral's experts as the plain per-expert loop (grouped_mm has no float64
    kernel, and the reference must not depend on it)."""
    if entry.family == "decoder-moe":
        return type(config).from_dict(config.to_dict(), experts_implementation="eager")
    return config


def numerics_row(row: Row, args) -> dict:
    device, dtype, ref_dtype = torch.device(args.device), args.dtype, args.reference_dtype
    entry = resolve_entry(row.name)
    cfg = resolve_config(row.name, assignments=[*model_settings(row, args.size), f"seed={SEED}"])
    vocab = DEFAULT_VOCAB_SIZE if entry.family in LANGUAGE_FAMILIES else None  # the embedded tokenizer's
    config = model_config(entry, cfg, vocab)
    case = build_case(entry, config, device, args)
    model = build_model(entry, cfg, config, device, family_of(entry))  # seeded: the trainer's init
    vary_init(model, entry)
    reference = build_model(entry, cfg, reference_config(entry, config), device, family_of(entry)).to(ref_dtype)
    reference.load_state_dict(model.state_dict())
    model = model.to(dtype)
    golden, golden_grads = forward_backward(reference, case.alone)
    del reference
    alone, alone_grads = forward_backward(model, case.alone)
    packed, packed_grads = forward_backward(model, case.packed)
    with torch.no_grad():
        leaky = case.leaky(model)
    errors = {"alone": errors_against(alone, alone_grads, golden, golden_grads),
              "packed": errors_against(packed, packed_grads, golden, golden_grads)}
    floor = FLOOR[dtype]
    checks = {q: errors["packed"][q] <= 2 * errors["alone"][q] + floor
              for q in errors["packed"] if q != "grads_worst_tensor"}
    leak = {"output": relative_error(leaky.values, golden.values), "output_max": max_error(leaky.values, golden.values)}
    probe = torch.empty(0, 1, family_of(entry).head_dim(config), dtype=dtype, device=device)
    return {
        "passed": all(checks.values()), "checks": checks, "errors": errors, "floor": floor,
        "leak_guard": {"errors": leak, "fails_the_rule": any(e > 2 * errors["alone"][q] + floor for q, e in leak.items())},
        "attention_backends": {name: runtime.resolve_backend(None, probe, window=w) for name, w in case.windows.items()}
        or "none (selective scan)",
        "output": "velocity" if entry.family == "diffusion-transformer" else "logits",
        "documents": case.documents, "tokens": sum(case.documents), "params": sum(p.numel() for p in model.parameters()),
        "loss": golden.loss.item(), "settings": model_settings(row, args.size),
    }


# -- stage 2: training -----------------------------------------------------------------------


def summarize(records: list[dict]) -> dict:
    """Throughput over the steps after warm-up (the first 10%, at least one); the loss curve whole."""
    if not records:
        return {"steps": 0}
    warmup = max(1, len(records) // 10) if len(records) > 1 else 0
    timed = records[warmup:]
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    peak = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 10)
    return {
        "steps": len(records), "warmup_steps": warmup,
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
        # the steady rate: a step that meets a new pack shape can wait seconds for attention kernels to compile
        "median_step_tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in timed),
        "slowest_step_s": max(r["step_time_s"] for r in timed),
        "mfu": sum(mfu) / len(mfu) if mfu else None, "peak_mem_gib": max(peak) if peak else None,
        "packing_efficiency": sum(r["packing_efficiency"] for r in records) / len(records),
        "loss_first": losses[0], "loss_last": losses[-1], "loss_min": min(losses),
        # first and last tenth of the curve: one noisy step does not decide
        "loss_down": sum(losses[-window:]) / window < sum(losses[:window]) / window, "losses": losses,
    }


def train_run(row: Row, args, packed: bool, sp: int = 1) -> dict:
    """One `hfpatch train` run in this process; past its cap, the steps it finished (metrics.jsonl)."""
    run_dir = args.out / "runs" / f"{row.name}_{'packed' if packed else 'padded'}{f'_sp{sp}' if sp > 1 else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = train_settings(row, args, run_dir, packed=packed, sp=sp)
    cfg = resolve_config(row.name, assignments=settings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = {"command": command_line(row.name, settings, nproc=sp)}
    try:
        records = run_training(cfg).records
    except TimeCap as exc:
        records = read_metrics(run_dir / "metrics.jsonl")
        result["stopped"] = f"{exc} after {len(records)} of {args.steps} steps"
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only metrics.jsonl, loss.png, config.json stay
    return {**result, **summarize(records)}


# -- stage 3: Mamba ---------------------------------------------------------------------------


class SavedActivations:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded): the activation memory."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> dict:
    """One forward + backward: seconds, activation bytes saved for backward, peak memory above the start (GPU)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    saved = SavedActivations(model)
    began = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = step()
    loss.backward()
    _sync(device)
    result = {"seconds": time.perf_counter() - began, "saved_mib": saved.bytes / 2**20, "loss": loss.item()}
    if device.type == "cuda":
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
    return result


def mamba_models(args):
    """The patched Mamba (the trainer's config, init and data) and transformers' unpatched class, same weights."""
    import transformers

    row = next(r for r in ROWS if r.name == "mamba")
    device, dtype = torch.device(args.device), args.dtype
    entry = resolve_entry("mamba")
    cfg = resolve_config("mamba", assignments=train_settings(row, args, args.out / "runs" / "mamba_scan"))
    tokenizer, dataset, _ = load_dataset(cfg, rank=0)
    config = model_config(entry, cfg, tokenizer.vocab_size, tokenizer.special_ids)
    patched = build_model(entry, cfg, config, device, family_of(entry)).to(dtype)
    unpatched = transformers.MambaForCausalLM(config).to(device, dtype).train()
    unpatched.load_state_dict(patched.state_dict())
    return patched, unpatched, dataset, tokenizer.pad_id


def mamba_speed(args, patched, unpatched, dataset, pad_id, rows: int) -> dict:
    """Whole-model forward + backward, one trainer row a step: packed (patched) vs padded (unpatched)."""
    device = torch.device(args.device)
    rows = dataset.rows[: rows + 1]  # the first is the warm-up

    def step(model, batch, packed):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
        with runtime.packed_batch(batch["cu_seqlens"].to(device)) if packed else contextlib.nullcontext():
            logits = model(**inputs, use_cache=False).logits
        return runtime.causal_lm_loss(logits.float(), batch["labels"].to(device))

    result = {"rows": len(rows) - 1, "seq_len": args.seq_len, "dtype": str(args.dtype)}
    for name, model, make, packed in (("packed", patched, packed_micro_batch, True),
                                      ("padded_unpatched", unpatched, padded_micro_batch, False)):
        batches = [make([row], 0, 1, pad_id) for row in rows]
        runs = [measure(device, model, lambda b=b: step(model, b, packed)) for b in batches]
        timed = runs[1:]
        tokens = sum(r.num_real_tokens for r in rows[1:])
        result[name] = {
            "tokens_per_s": tokens / sum(r["seconds"] for r in timed), "tokens": tokens,
            "peak_mem_gib": max(r["peak_mib"] for r in timed) / 1024 if "peak_mib" in timed[0] else None,
            "batch_shapes": [list(b["input_ids"].shape) for b in batches[1:]],
            "loss": sum(r["loss"] for r in timed) / len(timed),
        }
        model.zero_grad(set_to_none=True)
    result["speedup"] = result["packed"]["tokens_per_s"] / result["padded_unpatched"]["tokens_per_s"]
    # the same targets: the two mean losses agree to the precision's rounding
    result["loss_relative_difference"] = abs(result["packed"]["loss"] / result["padded_unpatched"]["loss"] - 1)
    return result


def mamba_activations(args, patched, unpatched, dataset, pad_id, row_counts=(1, 2, 4)) -> dict:
    """Layer 0's MambaMixer alone, forward + backward, on 1, 2 and 4 trainer rows of tokens: packed (the patched
    parallel scan over one [1, T] pack) vs padded (the unpatched mixer over the same documents, [B, longest])."""
    device = torch.device(args.device)
    hidden = patched.config.hidden_size
    mixers = {"packed": patched.backbone.layers[0].mixer, "padded_unpatched": unpatched.backbone.layers[0].mixer}
    points = []
    for count in row_counts:
        rows = dataset.rows[:count]
        pack = runtime.concat_rows(rows)
        padded = padded_micro_batch(rows, 0, 1, pad_id)
        tokens = sum(r.num_real_tokens for r in rows)
        generator = torch.Generator().manual_seed(count)
        x_packed = torch.randn(1, pack["input_ids"].shape[1], hidden, generator=generator).to(device, args.dtype)
        x_padded = torch.randn(*padded["input_ids"].shape, hidden, generator=generator).to(device, args.dtype)
        mask = padded["attention_mask"].to(device)

        def packed_step():
            with runtime.packed_batch(pack["cu_seqlens"].to(device)):
                return mixers["packed"](x_packed.requires_grad_()).float().square().mean()

        def padded_step():
            return mixers["padded_unpatched"](x_padded.requires_grad_(), attention_mask=mask).float().square().mean()

        point = {"rows": count, "real_tokens": tokens, "packed_shape": list(pack["input_ids"].shape),
                 "padded_shape": list(padded["input_ids"].shape)}
        for name, step in (("packed", packed_step), ("padded_unpatched", padded_step)):
            if device.type == "cuda":
                measure(device, mixers[name], step)  # warm-up: kernels load, the caching allocator fills
            point[name] = measure(device, mixers[name], step)
            point[name]["saved_kib_per_token"] = point[name]["saved_mib"] * 1024 / tokens
        points.append(point)
    return {"layer": "backbone.layers[0].mixer", "dtype": str(args.dtype), "points": points}


def mamba_stage(args, budget: Budget, env: dict) -> dict:
    stage, models = {"stage": "mamba", "environment": env}, []
    stage["setup"] = isolated(budget, lambda: models.append(mamba_models(args)) or {})
    if models:
        rows = 2 if args.device == "cuda" else 1
        stage["speed"] = isolated(budget, lambda: mamba_speed(args, *models[0], rows=rows))
        stage["activations"] = isolated(budget, lambda: mamba_activations(args, *models[0]))
    models.clear()
    release_memory()
    return stage


# -- stage 4: two GPUs ------------------------------------------------------------------------


def two_gpus_worker(args) -> int:
    """One torchrun rank: every row's packed run with sp=2 in turn, on one process group (rank 0 writes)."""
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, budget = dist.get_rank(), Budget(args.deadline, args.row_cap)
    results = {}
    for row in selected_rows(args):
        results[row.name] = isolated(budget, lambda: train_run(row, args, packed=True, sp=2))
        if rank == 0:
            write_json(args.out / ".two_gpus_runs.json", results)
    dist.destroy_process_group()
    return 0


def two_gpus_stage(args, budget: Budget, environment: dict) -> dict:
    stage = {"stage": "two_gpus", "environment": environment}
    if not args.two_gpus:
        return {**stage, "status": "not run: --two-gpus not given"}
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        return {**stage, "status": f"not run: {torch.cuda.device_count()} GPU"}
    if budget.left() < 2 * MIN_UNIT_S:
        return {**stage, "status": "not run: deadline"}
    raw = args.out / ".two_gpus_runs.json"
    raw.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--worker", "--device", args.device, "--out", str(args.out), "--rows", ",".join(r.name for r in selected_rows(args)),
               "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--micro-num", str(args.micro_num),
               "--row-cap", str(args.row_cap), "--deadline", str(max(budget.left() - 15, 1)),
               *(["--data", str(args.data)] if args.data else [])]
    if args.compile:
        command.append("--compile")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(budget.left() - 5, 1))
        stage["exit_code"], stage["log_tail"] = proc.returncode, (proc.stdout + proc.stderr).splitlines()[-20:]
    except subprocess.TimeoutExpired:
        stage["exit_code"] = "killed at the deadline"
    runs = json.loads(raw.read_text()) if raw.exists() else {}
    raw.unlink(missing_ok=True)
    one_gpu = read_stage(args.out, "train").get("rows", {})
    rtol = CURVE_RTOL[args.dtype]
    stage["rows"] = {}
    for row in selected_rows(args):
        run = runs.get(row.name, {"status": "not run: the workers stopped first"})
        reference = one_gpu.get(row.name, {}).get("packed", {}).get("losses")
        if run.get("losses") and reference:
            steps = min(len(run["losses"]), len(reference))
            diffs = [abs(a - b) / abs(b) for a, b in zip(run["losses"][:steps], reference[:steps])]
            run["curve"] = {"steps": steps, "max_relative_difference": max(diffs), "rtol": rtol,
                            "matches_one_gpu": max(diffs) <= rtol}
        stage["rows"][row.name] = run
    return stage


# -- driver -----------------------------------------------------------------------------------


def read_stage(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def selected_rows(args) -> list[Row]:
    return [row for row in ROWS if row.name in args.rows]


def environment(args) -> dict:
    device = torch.device(args.device)
    env = inspect_environment(args.dtype, 128, device)
    return {
        "device": env.device, "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "python": platform.python_version(), "torch": env.torch, "packages": env.packages,
        "attention_backend": attention_summary(env), "fused_loss": env.fused_loss, "dtype": str(args.dtype),
        "reference_dtype": str(args.reference_dtype), "steps": args.steps, "seq_len": args.seq_len,
        "micro_num": args.micro_num, "compile": args.compile, "all_rows": list(ROW_NAMES),
        "data": str(args.data) if args.data else None,
    }


def numerics_stage(args, budget: Budget, env: dict) -> None:
    stage = {"stage": "numerics", "environment": env, "rows": {},
             "rule": "packed error <= 2 x alone error + floor, each against the reference dtype run of the documents alone"}
    for row in selected_rows(args):
        print(f"== numerics: {row.name}", file=sys.stderr, flush=True)
        stage["rows"][row.name] = isolated(budget, lambda: numerics_row(row, args))
        write_json(args.out / "numerics.json", stage)


def train_stage(args, budget: Budget, env: dict) -> None:
    """Every row's packed run first, then the padded ones: a run cut short by the deadline loses comparisons,
    not rows."""
    rows = selected_rows(args)
    stage = {"stage": "train", "environment": env, "rows": {row.name: {} for row in rows}}
    for packed in (layout == "packed" for layout in args.layouts):
        for row in rows:
            family = resolve_entry(row.name).family
            layout = "packed" if packed else "padded"
            if not packed and family not in LANGUAGE_FAMILIES:
                stage["rows"][row.name][layout] = {"status": "not run: trains packed only"}
                continue
            print(f"== train: {row.name} {layout}", file=sys.stderr, flush=True)
            # padded Mamba runs transformers' token-by-token scan: a few steps give its speed, the Mamba stage the rest
            scale = 0.5 if family == "state-space" and not packed else 1.0
            stage["rows"][row.name][layout] = isolated(budget, lambda: train_run(row, args, packed=packed), scale=scale)
            write_json(args.out / "train.json", stage)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results dir: one JSON per stage, runs/ (metrics, loss plots)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help="comma-separated zoo rows [all]")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages [all]")
    parser.add_argument("--size", choices=("gpu", "tiny"), help="the rows' models and inputs: the GPU sizes (ROWS) or the "
                        "manifests' tiny configs [gpu on a GPU, tiny on a CPU]")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="precision under test; the reference runs float32 for bfloat16, float64 for float32 "
                        "[bfloat16 on a GPU, float32 on a CPU]")
    parser.add_argument("--layouts", default="packed,padded", help="train stage: packed, padded or both [both]")
    parser.add_argument("--steps", type=int, default=50, help="training steps a run [50]")
    parser.add_argument("--seq-len", type=int, default=None, help="packed row length [2048 on a GPU, 128 on a CPU]")
    parser.add_argument("--micro-num", type=int, default=None, help="micro-batches a step [4 on a GPU, 2 on a CPU]")
    parser.add_argument("--data", type=Path, help="text documents (jsonl, ...) for the language rows [the trainer's embedded corpus]")
    parser.add_argument("--compile", action="store_true", help="compile the decoder layers (costs a compile a run)")
    parser.add_argument("--two-gpus", action="store_true", help="the two-GPU stage (two gloo processes on a CPU)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run [320 on a GPU, 1800 on a CPU]")
    parser.add_argument("--row-cap", type=float, default=None,
                        help="seconds for one unit (a numerics row, a training run) [45 on a GPU, 300 on a CPU]")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    for label, given, known in (("row", args.rows, ROW_NAMES), ("stage", args.stages, STAGES),
                                ("layout", args.layouts, ("packed", "padded"))):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            parser.exit(2, f"error: unknown {label} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: no CUDA device here; pass --device cpu for the CPU smoke run\n")
    if args.steps < 1:
        parser.exit(2, "error: --steps must be at least 1\n")
    cuda = args.device == "cuda"
    args.size = args.size or ("gpu" if cuda else "tiny")
    args.seq_len = args.seq_len or (2048 if args.size == "gpu" else 128)
    args.micro_num = args.micro_num or (4 if cuda else 2)
    args.deadline = args.deadline or (320.0 if cuda else 1800.0)
    args.row_cap = args.row_cap or (45.0 if cuda else 300.0)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.reference_dtype = torch.float32 if args.dtype == torch.bfloat16 else torch.float64
    args.out = args.out.resolve()
    args.data = args.data.resolve() if args.data else None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return two_gpus_worker(args)
    budget = Budget(args.deadline, args.row_cap)
    run_mamba = "mamba" in args.stages and "mamba" in args.rows
    budget.reserved = MAMBA_RESERVE_S if run_mamba else 0.0
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    if "numerics" in args.stages:
        numerics_stage(args, budget, env)
    if "train" in args.stages:
        train_stage(args, budget, env)
    budget.reserved = 0.0
    if run_mamba:
        print("== mamba: packed scan vs transformers' unpatched Mamba", file=sys.stderr, flush=True)
        write_json(args.out / "mamba.json", mamba_stage(args, budget, env))
    if "two_gpus" in args.stages:
        print("== two_gpus", file=sys.stderr, flush=True)
        write_json(args.out / "two_gpus.json", two_gpus_stage(args, budget, env))
    return report_status(args)


def report_status(args) -> int:
    """One line per problem; 1 if a numerics check failed or a unit errored."""
    problems = []
    for name in ("numerics", "train", "two_gpus"):
        for row, result in read_stage(args.out, name).get("rows", {}).items():
            units = result.items() if name == "train" else [("", result)]
            for layout, unit in units:
                where = f"{name} {row}{' ' + layout if layout else ''}"
                if unit.get("status") == "error" or unit.get("passed") is False:
                    problems.append(f"{where}: {unit.get('error') or 'failed ' + str(unit.get('checks'))}")
    for problem in problems:
        print(f"!! {problem.splitlines()[0]}", file=sys.stderr)
    print(f"{'problems: ' + str(len(problems)) if problems else 'all rows ran'}; results in {args.out}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
