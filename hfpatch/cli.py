"""The `hfpatch` command line: parse arguments, call hfpatch, print. No logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hfpatch import actions, drift as drift_, engines, zoo
from hfpatch.errors import UserError
from hfpatch.train.command import train


class Group(click.Group):
    """Turn our own errors into one red line and exit 1, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)


def _entries_for(model: str | None, all_: bool) -> tuple[list[zoo.Entry], list[zoo.Entry]]:
    entries = zoo.load_zoo()
    if all_ == bool(model):
        raise click.UsageError("give a MODEL or --all (not both)")
    return entries, (entries if all_ else [zoo.resolve(model, entries)])


def _mark(flag: bool) -> str:
    return "✓" if flag else "✗"


@click.group(cls=Group)
@click.version_option(package_name="hfpatch")
def main():
    """Pinned InternEvo patches (packed varlen + ISP) for Hugging Face models."""


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_(as_json):
    """The support matrix: every zoo model, its pin, patch state, varlen and ISP."""
    rows = actions.support_matrix(zoo.load_zoo())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["model", "seed", "upstream", "patch", "varlen", "ISP"]
    table = [[r["model"], r["seed"], r["upstream"], r["patch"], _mark(r["varlen"]), _mark(r["isp"])] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *table)]
    for line in [headers, ["-" * w for w in widths], *table]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


@main.command()
@click.argument("model")
def show(model):
    """Everything the manifest says about MODEL, and the state of its files."""
    entries = zoo.load_zoo()
    entry = zoo.resolve(model, entries)
    up = entry.upstream
    click.echo(f"{entry.name} ({entry.seed_name}) - {entry.description}")
    click.echo(f"  directory:    {entry.relative_dir}")
    click.echo(f"  aliases:      {', '.join(entry.aliases)}")
    click.echo(f"  family:       {entry.family}")
    click.echo("  upstream:     " + (f"{up.package}=={up.version} {up.path}" if up.kind == "package" else "first-party port"))
    click.echo(f"  patch:        {entry.patch_state}" + (f" (reuses {entry.patch_from})" if entry.patch_from else ""))
    click.echo("  capabilities: " + ", ".join(f"{k} {_mark(v)}" for k, v in entry.capabilities.items()))
    if entry.known_good_pins:
        click.echo(f"  known-good:   {', '.join(entry.known_good_pins)}")
    if entry.notes:
        click.echo(f"  notes:        {entry.notes}")
    for file_name, digest in up.files.items():
        state = actions.file_state(entry, file_name, entries)
        click.echo(f"  {file_name}: {state.state} (pin sha256 {digest[:16]}…)")


@main.command()
@click.argument("model", required=False)
@click.option("--all", "all_", is_flag=True, help="every zoo entry")
@click.option("--force", is_flag=True, help="overwrite local changes and patched files")
@click.option("--record-hashes", is_flag=True, help="maintainers: write the materialized sha256 into the manifest")
def sync(model, all_, force, record_hashes):
    """Materialize MODEL's upstream files from the pinned package, sha256-checked."""
    entries, selected = _entries_for(model, all_)
    for entry in selected:
        if record_hashes:
            for line in actions.record_hashes(entry):
                click.echo(line)
            continue
        for line in actions.sync(entry, force=force, entries=entries):
            click.echo(line)


@main.command()
@click.argument("model", required=False)
def check(model):
    """Dry-run every patch (or MODEL's) against its pin; exit 1 on any failure (the CI drift gate)."""
    entries = zoo.load_zoo()
    selected = [zoo.resolve(model, entries)] if model else [e for e in entries if e.has_patch]
    failures = 0
    for entry in selected:
        for line in actions.check(entry, entries):
            failures += not line.ok
            click.secho(f"ok    {line.text}" if line.ok else f"FAIL  {line.text}", fg="green" if line.ok else "red")
    skipped = [e.name for e in entries if not e.has_patch and not model]
    if skipped:
        click.echo(f"no patch yet: {', '.join(skipped)}")
    if failures:
        raise SystemExit(1)


def _print_results(results):
    for result in results:
        click.echo(result.describe())


@main.command()
@click.argument("model")
@click.option("--target", type=click.Path(dir_okay=False, path_type=Path), help="patch your own copy of the upstream file")
@click.option("--engine", type=click.Choice(list(engines.ENGINE_IMPORTS)), default=engines.DEFAULT_ENGINE,
              show_default=True, help="where the patched file imports the runtime from")
@click.option("--dry-run", is_flag=True, help="check only, write nothing")
def apply(model, target, engine, dry_run):
    """Apply MODEL's patch to the zoo file (synced first if missing) or to --target."""
    entries = zoo.load_zoo()
    _print_results(actions.apply(zoo.resolve(model, entries), target, engine, dry_run, entries))


@main.command()
@click.argument("model")
@click.option("--target", type=click.Path(dir_okay=False, path_type=Path), help="revert your own patched copy")
def revert(model, target):
    """Revert MODEL's patch, restoring the pinned upstream bytes exactly."""
    entries = zoo.load_zoo()
    _print_results(actions.revert(zoo.resolve(model, entries), target, entries))


@main.command()
@click.argument("model", required=False)
def status(model):
    """State of each zoo file: missing, pristine, patched or modified."""
    entries = zoo.load_zoo()
    for entry in [zoo.resolve(model, entries)] if model else entries:
        for state in actions.status(entry, entries):
            click.echo(f"{entry.name:10s} {state.file_name:28s} {state.state}")


@main.command()
@click.argument("model")
def diff(model):
    """Unified diff from the pinned upstream file to MODEL's file in the zoo."""
    entries = zoo.load_zoo()
    text = actions.diff(zoo.resolve(model, entries), entries)
    click.echo(text if text else "no difference from the pin", nl=not text)


@main.command()
@click.argument("model", required=False)
@click.option("--all", "all_", is_flag=True, help="every library-model entry with a patch")
@click.option("--versions", help="comma-separated releases, e.g. 5.16.0,5.18.0")
@click.option("--latest", type=int, help="the N newest releases of the entry's package")
@click.option("--major", help="only releases of this major version (with --latest or alone)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--strict", is_flag=True, help="exit 1 unless the patch applies (clean or with offsets) everywhere")
def drift(model, all_, versions, latest, major, as_json, strict):
    """How MODEL's pinned patch fares on other upstream releases."""
    entries, selected = _entries_for(model, all_)
    packages = {e.upstream.package for e in selected if e.has_patch and e.upstream.kind == "package"}
    results = []
    for package in sorted(packages):
        wanted = versions.split(",") if versions else drift_.release_versions(package, latest, major)
        group = [e for e in selected if e.upstream.package == package]
        echo = None if as_json else (lambda r: click.echo(f"{r.model:10s} {r.package}=={r.version:10s} {r.state:9s} {r.detail}"))
        results += drift_.drift(group, wanted, entries, progress=echo)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    if strict and any(r.state not in ("pin", "identical", "clean", "offsets") for r in results):
        raise SystemExit(1)


@main.command()
@click.argument("model")
@click.option("--to", "version", required=True, help="the upstream release to rebase onto")
@click.option("--force", is_flag=True, help="overwrite an earlier candidate")
def refresh(model, version, force):
    """Rebase MODEL's patch onto another release by three-way merge; writes a candidate for review."""
    entries = zoo.load_zoo()
    model_entry = zoo.resolve(model, entries)
    result = drift_.refresh(model_entry, version, force, entries)
    if result.owner != model_entry.name:
        click.echo(f"{model_entry.name} reuses {result.owner}'s patch: the rebased patch is {result.owner}'s, "
                   f"shared by every entry that reuses it")
    if result.conflicts:
        click.secho(f"{result.conflicts} conflict(s): resolve the markers in {result.merged_file}", fg="yellow")
        raise SystemExit(1)
    click.echo(f"candidate patch written to {result.candidate}; review it, then rename it to drop .candidate")


@main.command("env")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the attention call to explain")
@click.option("--head-dim", type=click.IntRange(min=1), default=128, show_default=True, help="head dim of that call")
def env(dtype, head_dim):
    """Which attention backend a packed causal call runs here and why, and where hfpatch's own kernels run."""
    import torch

    from hfpatch.environment import inspect_environment

    report = inspect_environment(getattr(torch, dtype), head_dim)
    click.echo(f"torch {report.torch}; device {report.device}")
    click.echo("packages: " + ", ".join(f"{name} {version or '-'}" for name, version in report.packages.items()))
    click.echo(f"attention ({dtype}, head dim {head_dim}, causal), in auto's order:")
    for row in report.backends:
        state = "runs here (auto picks it)" if row.chosen else ("can run" if row.problem is None else row.problem)
        click.echo(f"  {row.name:<13} {state}")
    click.echo(f"fused linear cross-entropy: {report.fused_loss}")
    click.echo(f"SwiGLU MLP (compiled layers): {report.swiglu_mlp}")


main.add_command(train)

if __name__ == "__main__":
    main()
