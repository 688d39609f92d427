"""`evomerge merge`: materialise a recipe into a Hugging Face model directory."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.markup import escape

from evomerge.cli import app, console
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
    recipe: Path = typer.Argument(..., help="Recipe YAML (evomerge format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    shard_size: str = typer.Option("2GB", help="Largest safetensors shard."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickled *.bin weights (unsafe)."),
) -> None:
    """Merge the models of RECIPE and write the result as a Hugging Face model directory."""
    from evomerge.merge.export import export_model
    from evomerge.merge.sources import Sources
    from evomerge.recipe import Recipe

    r = Recipe.load(recipe)
    sources = Sources.from_recipe(r, allow_pickle=allow_pickle)
    with StageProgress("tensors") as progress:
        export_model(r, out, sources, shard_bytes=parse_size(shard_size), overwrite=force,
                     progress=lambda done, total: progress("merge", done, total))
    console.print(f"[green]wrote[/] {escape(str(out))}  ({r.merge_method}, recipe {r.hash()})", highlight=False)
