"""`evomerge merge`: materialise a recipe into a Hugging Face model directory."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.markup import escape

from evomerge.cli import app, console, err_console
from evomerge.cli.progress import StageProgress
from evomerge.errors import ConfigError


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count → bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--shard-size {text!r}: expected a size such as 2GB or 500MB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (evomerge format) or a mergekit config, "
                                             "multi-document mergekit-multi files included."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory (and "
                                                      "rebuild a multi-merge's intermediate merges)."),
    shard_size: str = typer.Option("2GB", help="Largest safetensors shard."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickled *.bin weights (unsafe)."),
    base_dir: Path = typer.Option(None, "--base-dir",
                                  help="mergekit configs: join relative model paths that exist under this directory."),
) -> None:
    """Merge the models of RECIPE and write the result as a Hugging Face model directory.

    RECIPE may also be a mergekit YAML (detected by its shape; see evomerge.merge.mergekit_multi):
    it is translated exactly as `evomerge recipe import-mergekit` does, and the merges of a
    mergekit-multi file run in dependency order (named ones into OUT.merges/NAME)."""
    from evomerge.merge.mergekit import recipe_from_mergekit
    from evomerge.merge.mergekit_multi import plan_documents, read_merge_file

    shard_bytes = parse_size(shard_size)
    found = read_merge_file(recipe)
    if found.kind == "recipe":
        _export(found.recipe, out, force, shard_bytes, allow_pickle)
        return
    if found.note:
        _warn(found.note)
    plan = plan_documents(found.documents, out, str(recipe))
    for step in plan:
        where = f"{recipe}" + (f" ({step.name})" if step.name else "")
        r = recipe_from_mergekit(step.config, base_dir=base_dir, where=where, warn=_warn)
        if not step.final and not force and (step.out / "config.json").is_file():
            console.print(f"reusing {escape(str(step.out))}  ({escape(str(step.name))}; --force rebuilds it)",
                          highlight=False)
            continue
        _export(r, step.out, force or not step.final, shard_bytes, allow_pickle)


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _export(r, out: Path, force: bool, shard_bytes: int, allow_pickle: bool) -> None:
    from evomerge.merge.export import export_model
    from evomerge.merge.sources import Sources

    sources = Sources.from_recipe(r, allow_pickle=allow_pickle)
    with StageProgress("tensors") as progress:
        export_model(r, out, sources, shard_bytes=shard_bytes, overwrite=force,
                     progress=lambda done, total: progress("merge", done, total))
    console.print(f"[green]wrote[/] {escape(str(out))}  ({r.merge_method}, recipe {r.hash()})", highlight=False)
