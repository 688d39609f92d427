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

    recipe = load_mergekit(config, base_dir=base_dir, warn=lambda m: err_console.print(
        f"[yellow]warning:[/] {m}", highlight=False, soft_wrap=True))
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


@recipe_app.command("add-fisher")
def add_fisher(
    recipe: Path = typer.Argument(..., help="evomerge recipe YAML with merge_method: fisher."),
    objective: list[str] = typer.Option(..., "--objective", help="Objective (lm-eval TASK[:split], default "
                                                                  "split search) whose data the Fisher is estimated on."),
    out: Path = typer.Option(None, "--out", "-o", help="Recipe file to write (default: stdout)."),
    evals_dir: Path = typer.Option(None, "--evals-dir", help="Directory of lm-eval task YAMLs."),
    device: str = typer.Option("cpu", "--device", help="Device for the gradient passes."),
) -> None:
    """Estimate (or reuse from the cache) each model's diagonal Fisher on the objectives' data and
    write the recipe with `parameters.fisher` pointing at the files."""
    from evomerge.errors import ConfigError
    from evomerge.evaluation.fisher import fisher_file, with_fisher
    from evomerge.evaluation.objective import Objective
    from evomerge.recipe import Recipe

    r = Recipe.load(recipe)
    if r.merge_method != "fisher":
        raise ConfigError(f"{recipe}: merge_method is {r.merge_method}; Fisher files are for merge_method: fisher")
    objectives = [Objective.parse(o) for o in objective]
    files = {m.alias: fisher_file(m.model, objectives, evals_dir=evals_dir, device=device) for m in r.models}
    done = with_fisher(r, files)
    _emit(done.to_yaml(), out, f"fisher files for {len(files)} models")


@recipe_app.command("add-scores")
def add_scores(
    recipe: Path = typer.Argument(..., help="evomerge recipe YAML with merge_method: metric_weighted."),
    objective: list[str] = typer.Option(..., "--objective", help="Objective TASK[:split] (default split "
                                                                  "search); repeat for several."),
    out: Path = typer.Option(None, "--out", "-o", help="Recipe file to write (default: stdout)."),
    evals_dir: Path = typer.Option(None, "--evals-dir", help="Directory of lm-eval task YAMLs."),
    limit: int = typer.Option(None, "--limit", min=1, help="Score only the first N documents of each split."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... [default: cuda if available]."),
) -> None:
    """Score each model of a metric_weighted recipe on the objectives (their fitness: Σ weight ·
    metric) and write the recipe with `parameters.score` set to it."""
    from evomerge.cli.eval import load_model_dir
    from evomerge.errors import ConfigError
    from evomerge.evaluation import Evaluator, Objective
    from evomerge.recipe import Recipe

    r = Recipe.load(recipe)
    if r.merge_method != "metric_weighted":
        raise ConfigError(f"{recipe}: merge_method is {r.merge_method}; scores are for merge_method: metric_weighted")
    objectives = [Objective.parse(o, limit=limit) for o in objective]
    models = []
    for m in r.models:
        model, tokenizer = load_model_dir(Path(m.model), device)
        score = Evaluator(objectives, tokenizer, evals_dir=evals_dir).evaluate(model).fitness(objectives)
        err_console.print(f"{m.alias}: {score:.4f}", highlight=False)
        models.append(m.model_copy(update={"parameters": {**m.parameters, "score": score}}))
    _emit(r.model_copy(update={"models": models}).to_yaml(), out, f"scores for {len(models)} models")
