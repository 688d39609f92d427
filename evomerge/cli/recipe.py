"""`evomerge recipe`: convert recipes to and from mergekit YAML."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from evomerge.cli import app, err_console

recipe_app = typer.Typer(help="Recipes: convert to and from mergekit YAML.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


def _emit(text: str, out: Path | None, what: str) -> None:
    """Write ``text`` atomically to ``out``, or to stdout so that it can be piped."""
    if out is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    from evomerge.io import atomic_write_text

    atomic_write_text(out, text)
    err_console.print(f"[green]wrote[/] {escape(str(out))}  ({escape(what)})", highlight=False)


@recipe_app.command("import-mergekit")
def import_mergekit(
    config: Path = typer.Argument(..., help="mergekit YAML config."),
    out: Path = typer.Option(None, "--out", "-o", help="Recipe file to write (default: stdout)."),
    base_dir: Path = typer.Option(None, "--base-dir",
                                  help="Join relative model paths that exist under this directory."),
) -> None:
    """Translate a mergekit config into an evomerge recipe."""
    from evomerge.merge.mergekit import load_mergekit

    recipe = load_mergekit(config, base_dir=base_dir)
    _emit(recipe.to_yaml(), out, f"{recipe.merge_method}, recipe {recipe.hash()}")


@recipe_app.command("export-mergekit")
def export_mergekit(
    recipe: Path = typer.Argument(..., help="evomerge recipe YAML."),
    out: Path = typer.Option(None, "--out", "-o", help="mergekit config to write (default: stdout)."),
) -> None:
    """Translate an evomerge recipe into a mergekit config (for `mergekit-yaml`)."""
    from evomerge.merge.mergekit import dump_mergekit, recipe_to_mergekit
    from evomerge.recipe import Recipe

    r = Recipe.load(recipe)
    config = recipe_to_mergekit(r)
    _emit(dump_mergekit(config), out, f"mergekit {config['merge_method']}")
