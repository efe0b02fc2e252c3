"""``hfpatch train``: parse options, call the trainer, print. No logic here."""

from __future__ import annotations

import json
import sys

import click

from hfpatch.errors import UserError

from .config import BY_NAME, NUMBER, SETTINGS, Setting, ignored_warning, resolve_config
from .errors import Interrupted
from .launch import strip_option, under_launcher, world_info

ARGV_KEY = "hfpatch.train.argv"
_CLICK_TYPES = {(int,): int, NUMBER: float, (str,): str}


def _option(setting: Setting):
    """The click option of a setting, from its one declaration."""
    shown = setting.default_help if setting.default_help is not None else setting.default
    help_text = setting.help if shown is None else f"{setting.help} [{shown}]"
    kwargs: dict = {"help": help_text, "default": None}
    if setting.choices is not None:
        kwargs["type"] = click.Choice(setting.choices)
    elif "/" not in setting.flag:  # "--on/--off" is a boolean pair
        kwargs.update(type=_CLICK_TYPES[setting.types], metavar=setting.metavar)
    return click.option(setting.flag, setting.name, **kwargs)


def setting_options(command):
    """Every setting with a flag, in declaration order."""
    for setting in reversed([s for s in SETTINGS if s.flag]):
        command = _option(setting)(command)
    return command


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
@setting_options
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE", help="any config key, e.g. --set model.hidden_size=128")
@click.option("--nproc", type=click.IntRange(min=1), help="start N local processes with torchrun")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="with --nproc: torchrun restarts after a worker failure")
@click.option("--print-config", is_flag=True, help="print the resolved config as JSON, with the source of each value, and exit")
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
        overrides = {BY_NAME[name].key: value for name, value in options.items()}
        cfg = resolve_config(model, config_file, overrides, assignments)
        warning = ignored_warning(cfg)
        if warning and not nproc and world_info().rank == 0:  # with --nproc, rank 0 of the workers says it
            click.secho(warning, fg="yellow", err=True)
        if print_config:
            resolved = {"model": cfg.model_name, **cfg.tree, "sources": cfg.describe_sources()}
            click.echo(json.dumps(resolved, indent=2, default=str))
            return
        if nproc:
            preflight(cfg, world=nproc)
            worker_args = strip_option(strip_option(ctx.meta[ARGV_KEY], "--nproc"), "--max-restarts")
            sys.exit(launch_workers(cfg, nproc, worker_args, max_restarts))
        summary = run_training(cfg)
    except UserError as exc:
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
