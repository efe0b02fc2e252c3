"""The training loop: set up the run from a TrainConfig, train, checkpoint, export.

``run_training`` is what every launched process calls (one process, or each
torchrun worker). ``preflight`` holds the cheap checks, which the ``--nproc``
parent runs too (``launch_workers``) so that bad input fails once, before any
worker starts; the parent then holds the run dir for its workers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import huggingface_hub.errors
import torch

from hfpatch import zoo
from hfpatch.environment import attention_summary, inspect_environment
from hfpatch.runtime import AttentionBackendError, ParallelMode, current_device, fused_loss_kernel, gpc, parallel_context
from hfpatch.runtime.attention import ENV_VAR as ATTENTION_ENV
from hfpatch.runtime.isp import OVERLAP_ENV as ISP_OVERLAP_ENV

from . import faults
from .build import build_model, compute_dtype, count_parameters, param_dtype
from .checkpoint import CheckpointManager, checkpoints_at, complete_checkpoints, read_state
from .config import TrainConfig, check_world_size
from .dataset import RowStream
from .errors import ConfigError, DataError, Interrupted, NonFiniteLossError, TrainError, UnreadableCheckpointError
from .export import export_hf
from .families import family_of, load_workload, model_config, resolve_entry
from .interrupt import StopRequest, interrupted_message
from .levers import resolve_levers
from .output_head import defer_output_projection, deferral_problem
from .launch import INTERRUPT_STATUSES, attempt_scoped_process_group, run_torchrun, under_launcher, world_info
from .metrics import MetricsLog, RunSummary, peak_flops, plot_loss, read_metrics, step_flops
from .offload import ActivationOffload
from .optim import build_optimizer, build_scheduler
from .parallelize import parallelize
from .progress import Progress
from .rundir import check_run_dir, claim_run_dir
from .step import train_step
from .tiling import tile_mlps

# What transformers' config classes raise for values that do not fit together.
CONFIG_VALIDATION_ERRORS = (ValueError, getattr(huggingface_hub.errors, "StrictDataclassError", ValueError))


def preflight(cfg: TrainConfig, world: int) -> zoo.Entry:
    """Checks that need no process group: sizes, model name, paths, model overrides; the zoo entry."""
    check_world_size(cfg, world)
    entry = resolve_entry(cfg.model_name)
    family_of(entry).check_supported(entry, cfg)
    for label, path in (("--data", cfg.data_path), ("--tokenizer", cfg.tokenizer_path), ("--model-path", cfg.model_path)):
        if path and not Path(path).exists():
            raise (DataError if label != "--model-path" else TrainError)(f"{label} {path} does not exist")
    try:
        model_config(entry, cfg, vocab_size=None)
    except CONFIG_VALIDATION_ERRORS as exc:  # e.g. heads that do not divide hidden_size
        settings = ", ".join(f"model.{k}={v!r}" for k, v in cfg.model_overrides.items()) or "no model.* settings"
        reason = str(exc.__cause__ or exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"{entry.name} rejects the model config ({settings}): {reason}") from None
    _check_resume_option(cfg)
    resolve_levers(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    _check_run_dir(cfg)  # last: it creates the dir
    return entry


def _check_resume_option(cfg: TrainConfig) -> None:
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"--resume must be auto, never or an existing checkpoint path; {cfg.resume} does not exist")


def _check_run_dir(cfg: TrainConfig) -> None:
    """The run dir can be made and written (an InternEvo file's save_ckpt_folder may name another cluster's disk)."""
    source = cfg.sources.get("out")
    from_file = source is not None and source.from_file
    check_run_dir(cfg.run_dir, label=f"out (from {source})" if from_file else "--out")


def _starts_fresh(cfg: TrainConfig) -> bool:
    """``--resume never`` on the first attempt; a torchrun restart resumes this run's own checkpoints."""
    return cfg.resume == "never" and world_info().attempt == 0


def launch_workers(cfg: TrainConfig, nproc: int, worker_args: list[str], max_restarts: int) -> int:
    """``--nproc``: hold the run dir, run the workers under torchrun; their exit status."""
    with claim_run_dir(cfg.run_dir, fresh=_starts_fresh(cfg)):
        status = run_torchrun(nproc, worker_args, max_restarts)
    if status in INTERRUPT_STATUSES:
        latest = CheckpointManager(cfg.run_dir / "checkpoints", cfg.keep_checkpoints, rank=0).latest()
        raise Interrupted(interrupted_message(status - 128, latest, cfg.run_dir), status - 128)
    return status


def run_training(cfg: TrainConfig) -> RunSummary:
    if cfg.attention_backend != "auto":  # what every attention call of this process reads
        os.environ[ATTENTION_ENV] = cfg.attention_backend
    if cfg.isp_overlap:
        os.environ[ISP_OVERLAP_ENV] = str(cfg.isp_overlap)
    info = world_info()
    entry = preflight(cfg, info.world)
    # One process holds the run dir: this one, rank 0 of a plain torchrun launch, or the --nproc launcher.
    holds_run_dir = info.rank == 0 and not under_launcher()
    claim = claim_run_dir(cfg.run_dir, fresh=_starts_fresh(cfg)) if holds_run_dir else contextlib.nullcontext()
    with claim, attempt_scoped_process_group(), parallel_context(sequence_parallel=cfg.sp, weight_parallel=cfg.wp):
        return _Trainer(cfg, entry).run()


@contextlib.contextmanager
def _setup_objects_frozen():
    """Python's full collections skip what setup built (tokenized corpus, model, compiled graphs): scanning it
    took 80-260 ms a collection on the H200 host, growing with the heap, a stall in the step that triggers one.
    The loop's own garbage is still collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass
class _State:
    """What a checkpoint must restore besides tensors."""

    step: int = 0
    rows_consumed: int = 0
    tokens_seen: int = 0


class _Trainer:
    def __init__(self, cfg: TrainConfig, entry) -> None:
        self.cfg = cfg
        self.entry = entry
        self.family = family_of(entry)
        self.rank = gpc.get_global_rank()
        self.world = gpc.get_world_size(ParallelMode.GLOBAL)
        self.dp_rank, self.dp = gpc.get_local_rank(ParallelMode.DATA), gpc.get_world_size(ParallelMode.DATA)
        self.sp_rank, self.sp = gpc.get_local_rank(ParallelMode.TENSOR), gpc.get_world_size(ParallelMode.TENSOR)
        self.device = current_device()
        self.is_main = self.rank == 0
        self.run_dir = cfg.run_dir
        self.state = _State()

    # -- setup ------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        if self.device.type == "cuda":
            # Unpatched attention (padded batches, vision towers) goes through torch SDPA, which on Hopper takes
            # cuDNN's kernel for a masked call: it builds a plan for every new shape, ~15 ms of host time a call on
            # an H200 (padded steps ran 60x their GPU time), and its gradients were NaN for Flux samples in bf16.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.workload = load_workload(self.entry, cfg, self.rank, param_dtype(cfg.dtype, self.device))
        self.tokenizer, self.dataset, self.source = self.workload.tokenizer, self.workload.dataset, self.workload.source
        self.config = self.workload.config
        self.attention = self.attention_backend()  # a backend asked for that cannot run fails here, before the model
        self.levers = resolve_levers(cfg, self.device)
        model = build_model(self.entry, cfg, self.config, self.device, self.family)
        if self.workload.prepare_model is not None:
            self.workload.prepare_model(model)
        self.fused_loss = self.use_fused_loss(model)
        if self.fused_loss:
            defer_output_projection(model, self.entry.name, "--fused-loss")
        elif cfg.loss_chunk:
            defer_output_projection(model, self.entry.name)
        if self.levers.tile_mlp:
            tile_mlps(model, self.levers.tile_mlp)
        self.params, self.matmul_params = count_parameters(model)
        self.weight_copy = parallelize(
            model, world=self.world, activation_checkpointing=self.levers.checkpointing,
            compute_dtype=compute_dtype(cfg.dtype, self.device), compile_layers=self.compile,
            cpu_offload=self.levers.cpu_offload, reshard_after_forward=cfg.reshard_after_forward,
            weight_copy=cfg.weight_copy,
        )
        self.model = model
        self.activation_offload = ActivationOffload() if self.levers.offload_activations else None
        with self.master_weights():
            self.optimizer = build_optimizer(self.model, cfg)
        if self.weight_copy:
            self.weight_copy.attach(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.stream = RowStream(len(self.dataset.rows), cfg.seed)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.keep_checkpoints, self.rank)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.is_main)
        self.peak = peak_flops(self.device)

    def master_weights(self) -> contextlib.AbstractContextManager:
        """Within it the model holds the float32 weights the optimizer updates (checkpoints, export)."""
        return self.weight_copy.masters_in_model() if self.weight_copy else contextlib.nullcontext()

    @property
    def layer_dtype(self) -> torch.dtype:
        """The dtype the layers compute in (--dtype mixed: bfloat16 on a GPU)."""
        return compute_dtype(self.cfg.dtype, self.device) or param_dtype(self.cfg.dtype, self.device)

    @property
    def compile(self) -> bool:
        """--compile, by default on a GPU (where it fuses the elementwise half of the step) unless activations
        are offloaded or the MLP tiled (long sequences, where attention dominates the step)."""
        if self.cfg.compile is not None:
            return self.cfg.compile
        return self.device.type == "cuda" and not (self.levers.offload_activations or self.levers.tile_mlp)

    def use_fused_loss(self, model) -> bool:
        """--fused-loss, by default on a GPU for a causal LM whose head is a plain projection."""
        if self.cfg.fused_loss is not None:
            return self.cfg.fused_loss
        return self.device.type == "cuda" and self.workload.loss is None and deferral_problem(model) is None

    def describe(self) -> str:
        cfg, data = self.cfg, self.dataset
        return (
            f"hfpatch train {self.entry.name}: {self.params / 1e6:.2f}M params "
            f"({self.family.describe_config(self.config)}), "
            f"world {self.world} = dp {self.dp} x sp {self.sp}, wp {cfg.wp}, device {self.device.type}, "
            f"attention {self.attention}{', decoder layers compiled' if self.compile else ''}"
            f"{', bfloat16 weight copy' if self.weight_copy else ''}"
            f"{f', fused linear loss ({fused_loss_kernel(self.device, self.layer_dtype)})' if self.fused_loss else ''}"
            f"{f', loss in {cfg.loss_chunk}-token chunks' if cfg.loss_chunk else ''}"
            f"{''.join(', ' + lever for lever in self.levers.describe())}\n"
            f"data: {self.source}: {data.num_documents} documents, {data.num_tokens:,} tokens -> {len(data.rows)} rows "
            f"of {data.seq_len} ({'packed' if cfg.packed else 'padded batches'}; packing efficiency {data.efficiency:.1%}); "
            f"tokenizer: {self.workload.tokenizer_source}\n"
            f"{self.rows_per_step * data.seq_len:,} token slots per step (micro_num {cfg.micro_num} x micro_bsz {cfg.micro_bsz} "
            f"x dp {self.dp} x seq_len {data.seq_len}); run dir {self.run_dir}"
        )

    def attention_backend(self) -> str:
        """The varlen backend this run's attention calls take, and why faster ones were passed over."""
        try:
            environment = inspect_environment(self.layer_dtype, self.family.head_dim(self.config), self.device)
            return attention_summary(environment)
        except AttentionBackendError as exc:
            raise ConfigError(f"--attention-backend: {exc}") from None

    @property
    def rows_per_step(self) -> int:
        return self.dp * self.cfg.micro_num * self.cfg.micro_bsz

    # -- resume -----------------------------------------------------------------------

    def resume(self, log: Callable[[str], None]) -> str | None:
        cfg = self.cfg
        if _starts_fresh(cfg):
            return None  # an earlier run here was moved aside
        self.checkpoints.clean_partial()
        if cfg.resume == "auto":
            candidates = complete_checkpoints(self.checkpoints.root)[::-1]
            if not candidates:
                log(f"no checkpoint in {self.checkpoints.root}: starting at step 1")
                return None
        else:
            candidates = checkpoints_at(Path(cfg.resume))
        for i, path in enumerate(candidates):  # newest first; an unreadable one falls back to the one before
            try:
                saved = read_state(path)
                self.check_resumable(path, saved)
                with self.master_weights():
                    CheckpointManager.load(path, saved, self.model, self.optimizer, rank=self.rank, world=self.world)
            except UnreadableCheckpointError as exc:
                if i + 1 == len(candidates):
                    raise UnreadableCheckpointError(
                        f"{exc}; no older checkpoint to fall back to: start a new run with --resume never "
                        f"(moves {self.run_dir} aside) or another --out") from None
                log(f"warning: {exc}; falling back to {candidates[i + 1]}")
                continue
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = _State(step=saved["step"], rows_consumed=saved["rows_consumed"], tokens_seen=saved["tokens_seen"])
            return str(path)

    def check_resumable(self, path: Path, saved: dict[str, Any]) -> None:
        """The checkpoint is of this model and this data (its tensors are checked when loaded)."""
        fresh = f"to start a new run instead, pass --resume never (moves {self.run_dir} aside) or another --out"
        if saved.get("model", self.entry.name) != self.entry.name:
            raise ConfigError(f"checkpoint {path} was saved by a {saved['model']} run, not {self.entry.name}; {fresh}")
        if saved.get("dataset_fingerprint") != self.dataset.fingerprint:
            raise ConfigError(f"checkpoint {path} was trained on different data or seq_len; resume with the same "
                              f"--data and --seq-len, or {fresh}")

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.state.step, "rows_consumed": self.state.rows_consumed, "tokens_seen": self.state.tokens_seen,
            "dataset_fingerprint": self.dataset.fingerprint, "scheduler": self.scheduler.state_dict(),
            "model": self.entry.name, "world_size": self.world, "sp": self.sp, "wp": self.cfg.wp,
        }

    def save(self) -> Path:
        with self.master_weights():
            return self.checkpoints.save(self.state.step, self.model, self.optimizer, self.trainer_state())

    # -- the loop ---------------------------------------------------------------------

    def micro_batches(self, rows: list[int], position: int) -> list[dict]:
        """This rank's micro-batches of the step's ``rows`` (read from stream ``position`` on)."""
        cfg = self.cfg
        first = self.dp_rank * cfg.micro_num * cfg.micro_bsz
        mine = rows[first : first + cfg.micro_num * cfg.micro_bsz]
        return [
            self.workload.micro_batch(
                [self.dataset.rows[i] for i in mine[m * cfg.micro_bsz : (m + 1) * cfg.micro_bsz]], self.sp_rank, self.sp,
                # random draws (Flux's noise) of a micro-batch: fixed by the seed and its stream position
                cfg.seed * 1_000_003 + position + first + m * cfg.micro_bsz,
            )
            for m in range(cfg.micro_num)
        ]

    def one_step(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        step = state.step + 1
        rows = self.stream.take(state.rows_consumed, self.rows_per_step)
        stats = self.workload.stats([self.dataset.rows[i] for i in rows])
        started = time.perf_counter()
        result = train_step(
            self.model, self.optimizer, self.scheduler, self.micro_batches(rows, state.rows_consumed),
            num_targets=stats.targets, packed=cfg.packed, device=self.device,
            clip_grad_norm=float(cfg.clip_grad_norm), step=step, rank=self.rank,
            loss_fn=self.workload.loss, extra_inputs=self.workload.extra_inputs,
            input_dtype=param_dtype(cfg.dtype, self.device), loss_chunk=cfg.loss_chunk,
            fused_loss=self.fused_loss, activation_offload=self.activation_offload,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        state.step, state.rows_consumed = step, state.rows_consumed + len(rows)
        state.tokens_seen += stats.real_tokens
        record = {
            "step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
            "tokens": stats.real_tokens, "tokens_per_s": stats.real_tokens / elapsed, "packing_efficiency": stats.efficiency,
            "step_time_s": elapsed, "epoch": round(self.stream.epoch_of(state.rows_consumed), 4),
        }
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.peak:
            flops = step_flops(self.matmul_params, *self.family.flops_shape(self.config), stats)
            record["mfu"] = flops / (elapsed * self.world * self.peak)
        return record

    def run(self) -> RunSummary:
        started = time.perf_counter()
        self.setup()
        progress = Progress(enabled=self.is_main, total=self.cfg.total_steps, every=self.cfg.log_every)
        progress.log(self.describe())
        resumed_from = self.resume(progress.log)
        if resumed_from:
            progress.log(f"resumed from {resumed_from} (step {self.state.step})")
        self.metrics.start(self.state.step)
        self.write_run_config()
        progress.begin(self.state.step)
        try:
            with StopRequest() as stop, _setup_objects_frozen():
                records = self.train(progress, stop)
        finally:
            progress.close()
        return self.finish(records, resumed_from, time.perf_counter() - started)

    def write_run_config(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = {"model": self.cfg.model_name, **self.cfg.tree}
            (self.run_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))

    def kept_checkpoint(self) -> str:
        latest = self.checkpoints.latest()
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved before it"

    def train(self, progress: Progress, stop: StopRequest) -> list[dict[str, Any]]:
        """Steps up to total_steps, checkpointing on schedule, at the end, and when SIGINT/SIGTERM stops it."""
        cfg = self.cfg
        records, saved_step = [], self.state.step
        while self.state.step < cfg.total_steps:
            try:
                record = self.one_step()
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"{exc}; stopped before updating the weights, {self.kept_checkpoint()}") from None
            except torch.OutOfMemoryError:
                raise TrainError(
                    f"out of GPU memory in step {self.state.step + 1} (micro-batches of {cfg.micro_bsz} x {cfg.seq_len} "
                    f"tokens); pass --long-context (checkpointing, activation offload, a tiled MLP) or lower --seq-len "
                    f"/ --micro-bsz; {self.kept_checkpoint()}") from None
            self.metrics.write(record)
            records.append(record)
            progress.update(record)
            faults.maybe_crash(self.state.step, self.rank, "step")
            if cfg.save_checkpoints and cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                self.save()
                saved_step = self.state.step
            signum = stop.agreed()
            if signum:
                saves = cfg.save_checkpoints and saved_step != self.state.step
                latest = self.save() if saves else self.checkpoints.latest()
                raise Interrupted(interrupted_message(signum, latest, self.run_dir), signum)
        if cfg.save_checkpoints and saved_step != self.state.step:
            self.save()
        return records

    def finish(self, records: list[dict[str, Any]], resumed_from: str | None, wall_s: float) -> RunSummary:
        """Export, plot, and the summary."""
        cfg = self.cfg
        exported = None
        if cfg.export:
            with self.master_weights():
                exported = str(export_hf(self.model, self.tokenizer, cfg.export, rank=self.rank,
                                         stock_model=self.family.stock_model))
        paths = {"metrics": str(self.metrics.path)}
        if self.is_main:
            plot = plot_loss(read_metrics(self.metrics.path), self.run_dir / "loss.png", f"{self.entry.name}: training loss")
            if plot:
                paths["loss plot"] = str(plot)
        latest = self.checkpoints.latest()
        return RunSummary(
            model=self.entry.name,
            layout=f"world {self.world} = dp {self.dp} x sp {self.sp}, wp {cfg.wp}, {'packed' if cfg.packed else 'padded'}",
            records=records, final_step=self.state.step, total_steps=cfg.total_steps, wall_s=wall_s,
            resumed_from=resumed_from, checkpoint=str(latest) if latest else None, export=exported, paths=paths,
        )
