"""`evomerge zoo` commands: build the local expert zoo, list presets, regenerate evals/."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from evomerge.cli import app, console

zoo_app = typer.Typer(help="Build the local zoo of tiny experts (no hub, no GPU needed).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def build(
    preset: str = typer.Option("demo", "--preset", "-p", help="Preset name (tiny | demo | smollm2: a real pretrained base from PyPI + LoRA experts)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: the cache)."),
    family: str = typer.Option("llama", "--family", help="Model family (llama | qwen2)."),
    workers: int = typer.Option(None, "--workers", help="Processes for the experts (default: CPU count)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached zoo exists."),
) -> None:
    """Train a base model and its experts, or return the cached zoo at once."""
    from evomerge.zoo import build_zoo

    with Progress(
        TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        bars: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = bar.add_task(stage, total=total)
            bar.update(bars[stage], completed=done)
            if done == total and not console.is_terminal:  # no live bar in logs: one line per stage
                console.print(f"{stage}: {total} steps done")

        info = build_zoo(preset, out=out, family=family, workers=workers, force=force, progress=report)
    table = Table(title=f"zoo {info.preset} ({info.family}) · {info.root}", show_lines=False)
    table.add_column("model")
    table.add_column("path")
    table.add_column("expert on")
    table.add_row("base", str(info.base), "")
    for name, path in info.experts.items():
        table.add_row(name, str(path), ", ".join(info.expert_tasks[name]))
    console.print(table)
    how = "cached" if info.cached else f"built in {info.seconds:.0f} s"
    console.print(f"{how}; cross-skill tasks: {', '.join(info.cross_tasks) or '-'}; all tasks: {', '.join(info.tasks)}")


@zoo_app.command("presets")
def presets() -> None:
    """List the presets and what they build."""
    from evomerge.zoo import PRESETS

    table = Table()
    for col in ("preset", "arch", "steps (base/expert)", "experts", "about"):
        table.add_column(col)
    for p in PRESETS.values():
        table.add_row(p.name, str(p.arch), f"{p.base_steps}/{p.expert_steps}",
                      ", ".join(e.name for e in p.experts), p.about)
    from evomerge.zoo.smollm2 import PRETRAINED_PRESETS

    for p in PRETRAINED_PRESETS.values():
        table.add_row(p.name, "SmolLM2-135M-Instruct (pretrained)", "-/" + "/".join(str(e.steps) for e in p.experts),
                      ", ".join(e.name for e in p.experts), p.about)
    console.print(table)


@zoo_app.command("evals")
def evals(
    out: Path = typer.Option(None, "--out", help="evals directory (default: <repo>/evals)."),
) -> None:
    """Regenerate the lm-eval task YAMLs and held-out JSONL data of every zoo task."""
    from evomerge.zoo.evals import default_evals_dir, write_evals

    paths = write_evals(out or default_evals_dir())
    console.print(f"wrote {len(paths)} files under {out or default_evals_dir()}")


@zoo_app.command("path")
def path(
    preset: str = typer.Option("demo", "--preset", "-p"),
    family: str = typer.Option("llama", "--family"),
) -> None:
    """Print the cached zoo's directory (for scripts: `$(evomerge zoo path)/math`)."""
    from evomerge.errors import EvomergeError
    from evomerge.zoo import get_preset, zoo_dir
    from evomerge.zoo.presets import PRETRAINED_PRESET_NAMES

    if preset in PRETRAINED_PRESET_NAMES:
        from evomerge.zoo.smollm2 import get_pretrained, pretrained_dir

        root = pretrained_dir(get_pretrained(preset))
    else:
        root = zoo_dir(get_preset(preset), family)
    if not (root / "zoo.json").is_file():
        raise EvomergeError(f"no {preset} zoo ({family}) built yet at {root}; run `evomerge zoo build --preset {preset}`")
    print(root)
