"""`evomerge zoo` commands: build the local expert zoo, list presets, regenerate evals/."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from evomerge.cli import app, console
from evomerge.cli.progress import StageProgress

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

    with StageProgress("steps", transient=False) as report:
        info = build_zoo(preset, out=out, family=family, workers=workers, force=force, progress=report)
    table = Table(title=Text(f"zoo {info.preset} ({info.family}) · {info.root}"), show_lines=False)
    table.add_column("model")
    table.add_column("path")
    table.add_column("expert on")
    table.add_row("base", Text(str(info.base)), "")
    for name, path in info.experts.items():
        table.add_row(Text(name), Text(str(path)), Text(", ".join(info.expert_tasks[name])))
    console.print(table)
    how = "cached" if info.cached else f"built in {info.seconds:.0f} s"
    console.print(Text(f"{how}; cross-skill tasks: {', '.join(info.cross_tasks) or '-'}; all tasks: {', '.join(info.tasks)}"))


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
    out: Path = typer.Option(None, "--out", "-o", help="evals directory (default: the shipped evals/, in a "
                             "checkout the repository's evals/)."),
) -> None:
    """Regenerate the lm-eval task YAMLs and held-out JSONL data of every zoo task."""
    from evomerge.paths import evals_dir
    from evomerge.zoo.evals import write_evals

    paths = write_evals(out or evals_dir())
    console.print(Text(f"wrote {len(paths)} files under {out or evals_dir()}"))


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
