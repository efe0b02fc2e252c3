"""``hfpatch train``: parse options, call the trainer, print. No logic here."""

from __future__ import annotations

import json
import sys

import click

from hfpatch import actions, engines, patching, upstream, zoo

from .config import resolve_config
from .errors import Interrupted, TrainError
from .launch import strip_option, under_launcher, world_info

USER_ERRORS = (TrainError, zoo.ZooError, actions.ActionError, patching.PatchError, upstream.UpstreamError, engines.EngineError)
ARGV_KEY = "hfpatch.train.argv"

# Command-line option -> the config key it overrides.
OPTION_KEYS = {
    "model_path": "model_path", "data": "data.train_folder", "tokenizer": "data.tokenizer_path",
    "text_field": "data.text_field", "seq_len": "data.seq_len", "micro_num": "data.micro_num",
    "micro_bsz": "data.micro_bsz", "packed": "data.use_packed_dataset", "overflow": "data.overflow",
    "sp": "parallel.tensor.size", "wp": "parallel.weight.size", "steps": "total_steps", "lr": "lr",
    "warmup_steps": "warmup_steps", "seed": "seed", "dtype": "model.dtype",
    "activation_checkpointing": "model.checkpoint", "compile": "model.compile", "out": "out", "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints", "resume": "resume", "export": "export", "loss_chunk": "loss_chunk",
}


class _KeepArgv(click.Command):
    """Remembers the raw arguments so ``--nproc`` can hand them to the workers."""

    def parse_args(self, ctx, args):
        ctx.meta[ARGV_KEY] = list(args)
        return super().parse_args(ctx, args)


def _report(exc: Exception) -> None:
    info = world_info()
    if info.rank == 0:
        click.secho(f"error: {exc}", fg="red", err=True)
    elif info.local_rank == 0:  # another node's first rank: its error may be its own
        click.secho(f"error (rank {info.rank}): {exc}", fg="red", err=True)


def _report_interrupt(message: str) -> None:
    if world_info().rank == 0 and not under_launcher():  # under --nproc the launcher says it
        click.secho(message, fg="yellow", err=True)


@click.command("train", cls=_KeepArgv)
@click.argument("model")
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="InternEvo-style python config file")
@click.option("--model-path", metavar="DIR", help="start from this local HF checkpoint dir (default: the zoo's tiny random-init config)")
@click.option("--data", metavar="PATH", help="jsonl / parquet / datasets dir (default: the embedded pydoc corpus); "
              "llava: image+text jsonl; flux: dir of .safetensors latents (default: synthetic)")
@click.option("--tokenizer", metavar="DIR", help="local tokenizer dir (default: the model's own, else the embedded BPE)")
@click.option("--text-field", metavar="NAME", help="text field/column of the data [text]")
@click.option("--seq-len", type=int, help="packed row length [512]")
@click.option("--micro-num", type=int, help="micro-batches per step, i.e. gradient accumulation [4]")
@click.option("--micro-bsz", type=int, help="packed rows per micro-batch [1]")
@click.option("--packed/--padded", default=None, help="varlen packed rows, or padded batches of the same documents [packed]")
@click.option("--overflow", type=click.Choice(["auto", "error", "split", "truncate"]), help="documents longer than seq_len [auto: split the embedded corpus, error otherwise]")
@click.option("--sp", type=int, help="ISP sequence parallel size [1]")
@click.option("--wp", type=int, help="weight parallel (FSDP2) size [1]")
@click.option("--steps", type=int, help="optimizer steps [30]")
@click.option("--lr", type=float, help="peak learning rate [3e-3]")
@click.option("--warmup-steps", type=int, help="linear warmup steps [10% of steps]")
@click.option("--seed", type=int, help="seed for init and data order [42]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float64", "bfloat16"]), help="parameter dtype [auto: bf16 compute over float32 weights on GPU, float32 on CPU]")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=None, help="recompute activations in backward [off]")
@click.option("--compile/--no-compile", default=None, help="torch.compile each decoder layer's MLP and norms [off]")
@click.option("--loss-chunk", type=int, metavar="TOKENS", help="compute the LM loss this many tokens at a time, so the "
              "logits of a long sequence never exist whole (language models, LLaVA); 0 = off [0]")
@click.option("--out", metavar="DIR", help="run directory for checkpoints, metrics.jsonl, loss.png [runs/MODEL]")
@click.option("--checkpoint-every", type=int, help="save every N steps; 0 = only at the end [0]")
@click.option("--keep-checkpoints", type=int, help="complete checkpoints to keep [2]")
@click.option("--resume", metavar="auto|never|PATH", help="auto (newest checkpoint in --out), never, or a checkpoint path [auto]")
@click.option("--export", metavar="DIR", help="write an HF-format checkpoint (safetensors + tokenizer) here at the end")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="any config key, e.g. --set model.hidden_size=128")
@click.option("--nproc", type=click.IntRange(min=1), help="start N local processes with torchrun")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True, help="with --nproc: torchrun restarts after a worker failure")
@click.option("--print-config", is_flag=True, help="print the resolved config as JSON and exit")
@click.pass_context
def train(ctx, model, config_file, assignments, nproc, max_restarts, print_config, **options):
    """Train MODEL (a zoo name) with packed varlen data and ISP.

    \b
    hfpatch train llama2 --nproc 2 --sp 2 --steps 30
    hfpatch train llama2 -c configs/llama2_tiny_isp.py --nproc 2
    torchrun --nproc-per-node 8 -m hfpatch.train llama2 -c configs/llama2_gpu_isp_wp.py
    """
    # Imported here so that `hfpatch --help` and other commands do not load torch.
    from .loop import launch_workers, preflight, run_training
    from .metrics import format_summary

    try:
        overrides = {OPTION_KEYS[name]: value for name, value in options.items()}
        cfg = resolve_config(model, config_file, overrides, assignments)
        if print_config:
            click.echo(json.dumps({"model": cfg.model_name, **cfg.tree}, indent=2, default=str))
            return
        if nproc:
            preflight(cfg, world=nproc)
            worker_args = strip_option(strip_option(ctx.meta[ARGV_KEY], "--nproc"), "--max-restarts")
            sys.exit(launch_workers(cfg, nproc, worker_args, max_restarts))
        summary = run_training(cfg)
    except USER_ERRORS as exc:
        _report(exc)
        sys.exit(1)
    except Interrupted as exc:
        _report_interrupt(str(exc))
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        _report_interrupt("interrupted")
        sys.exit(130)
    if world_info().rank == 0:
        click.echo(format_summary(summary))
