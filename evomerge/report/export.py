"""``evomerge export``: pick a trial of a run and ship it as a Hugging Face model directory.

The chosen trial's recipe goes through the streaming exporter
(:func:`evomerge.merge.export.export_model`, which also writes ``evomerge_recipe.yaml`` and the
model card); this module adds the card's run-specific sections (parents, metrics, how the
merge was found) and, when mergekit can express the recipe, ``mergekit_config.yml``.

Choosing: ``--trial N`` exactly; ``--best`` the highest fitness on the search split (what the
optimizer maximised; validation scores are for reporting, not selection); ``--prefer w1,w2``
the member of the evaluated Pareto set maximising Σ wᵢ·objectiveᵢ. Points of the surrogate's
predicted front were never evaluated, so they are not exported; the report links each one to
its nearest evaluated trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from evomerge.errors import ConfigError, EvomergeError
from evomerge.markdown import md_cell as _md, md_code
from evomerge.outputs import check_output_dir
from evomerge.recipe import Recipe
from evomerge.report.analysis import best_trial, pareto_trials, prefer_trial
from evomerge.report.data import ReportData, TrialInfo
from evomerge.report.html import fmt_num, fmt_time

MERGEKIT_FILE = "mergekit_config.yml"


@dataclass
class ExportResult:
    path: Path
    trial: TrialInfo
    how: str  # how the trial was chosen, in words
    mergekit: Path | None
    mergekit_note: str | None  # why there is no mergekit config, or a caveat about it


def parse_weights(text: str) -> list[float]:
    """``"0.7,0.3"`` → [0.7, 0.3]; a clear error for anything else."""
    try:
        weights = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--prefer {text!r}: expected comma-separated numbers such as 0.7,0.3") from None
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--prefer {text!r}: weights must be non-negative numbers, not all zero")
    return weights


def choose_trial(data: ReportData, trial: int | None = None, best: bool = False,
                 prefer: list[float] | None = None) -> tuple[TrialInfo, str]:
    """The trial to export and a sentence saying how it was chosen. Exactly one selector."""
    given = sum([trial is not None, bool(best), prefer is not None])
    if given != 1:
        raise ConfigError("choose the trial to export with exactly one of --trial N, --best or --prefer w1,w2,...")
    if trial is not None:
        try:
            t = data.trial(trial)
        except KeyError as e:
            raise EvomergeError(f"{data.run.run_dir}: {e.args[0]}") from None
        if not t.ok:
            reason = (t.error or "no scores recorded").strip().splitlines()[0] if (t.error or "").strip() else "no scores recorded"
            raise EvomergeError(f"{data.run.run_dir}: trial {trial} did not evaluate successfully ({reason}); "
                                "pick an evaluated trial (see `evomerge report --text`)")
        return t, f"chosen by hand (`--trial {trial}`)"
    if best:
        t = best_trial(data)
        return t, "the highest fitness on the search split (`--best`)"
    t = prefer_trial(data, list(prefer or []))
    w = ", ".join(f"{o.name}={p:g}" for o, p in zip(data.objectives, prefer or []))
    return t, f"the Pareto-set member maximising the weighted objectives {w} (`--prefer`)"


def card_sections(data: ReportData, t: TrialInfo, how: str, mergekit_note: str | None, has_mergekit: bool) -> str:
    """Run-specific model-card sections: how the merge was found, metrics against the parents, reproduce."""
    on_front = any(x.id == t.id for x in pareto_trials(data))
    n_done = len(data.ok_trials) + len(data.failed_trials)
    found = [f"Trial **{t.id}** of run {md_code(data.run.name or data.run.run_dir)} "
             f"({n_done} evaluations, {len(data.objectives)} objective(s)), {how}."]
    facts = []
    if t.optimizer:
        facts.append(f"optimizer {md_code(t.optimizer)}" + (f", generation {t.generation}" if t.generation is not None else ""))
    if data.run.space:
        facts.append(f"search space {md_code(data.run.space)}")
    if data.run.seed is not None:
        facts.append(f"seed {data.run.seed}")
    if t.finished is not None:
        facts.append(f"evaluated {fmt_time(t.finished)}")
    if facts:
        found.append("Found with " + ", ".join(facts) + ".")
    found.append("It is on the run's evaluated Pareto front." if on_front
                 else "It is not on the run's evaluated Pareto front (another trial scores at least as well everywhere).")

    parents = [m for m in data.models if m.search or m.validation]
    head = ["objective", "this merge · search", "this merge · validation",
            *(f"{_md(m.alias)} · search" for m in parents)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in data.objectives:
        cells = [_md(o.label), fmt_num(t.search.get(o.name)), fmt_num(t.validation.get(o.name)),
                 *(fmt_num(m.search.get(o.name)) for m in parents)]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("| fitness (Σ weight × value) | " + fmt_num(data.fitness(t)) + " | — | "
                + " | ".join(fmt_num(data.scalarise(m.search)) if m.search else "—" for m in parents)
                + (" |" if parents else "|"))

    repro = ["```bash", "evomerge merge evomerge_recipe.yaml --out merged"]
    if has_mergekit:
        repro.append(f"mergekit-yaml {MERGEKIT_FILE} merged   # same merge with mergekit")
    repro.append("```")
    lines = ["## How it was found", "", *found, "", "## Metrics", "",
             "Higher is better unless marked otherwise; search-split scores were optimised, "
             "validation-split scores were held out.", "", *rows, "", "## Reproduce", "", *repro]
    if mergekit_note:
        lines += ["", mergekit_note]
    return "\n".join(lines)


def mergekit_yaml(recipe: Recipe) -> tuple[str | None, str | None]:
    """(mergekit YAML, note): the YAML when mergekit can express the recipe, else a note saying why not."""
    try:
        from evomerge.merge.mergekit import recipe_to_mergekit
    except ImportError:  # pragma: no cover - the module ships with evomerge
        return None, "No mergekit config: this evomerge has no mergekit translation."
    try:
        config = recipe_to_mergekit(recipe)
    except (ConfigError, EvomergeError) as e:
        return None, f"No mergekit config: mergekit cannot express this recipe ({e})."
    from evomerge.merge.methods import OPERATORS

    note = None
    op = OPERATORS.get(recipe.merge_method)
    if op is not None and op.random:
        note = (f"`{MERGEKIT_FILE}` uses `{recipe.merge_method}`, whose random masks mergekit does not seed: "
                "a mergekit run draws a different sample than this checkpoint (evomerge seeds it from the recipe).")
    return yaml.safe_dump(config, sort_keys=False), note


def export_trial(data: ReportData, t: TrialInfo, out: str | Path, how: str = "", *, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None, shard_bytes: int | None = None) -> ExportResult:
    """Materialise trial ``t`` into ``out`` with its card, evomerge recipe and (when possible) mergekit YAML."""
    from evomerge.merge.export import DEFAULT_SHARD_BYTES, export_model
    from evomerge.merge.sources import Sources

    if not t.recipe:
        raise EvomergeError(f"{data.run.run_dir}: trial {t.id} has no stored recipe")
    run_dir = [("run directory", data.run.run_dir)]
    check_output_dir(out, overwrite=overwrite, protect=run_dir)
    from evomerge.lineage import export_member, is_lineage

    if is_lineage(t.recipe):  # a model-archive child: its weights come from its lineage
        card = card_sections(data, t, how or f"trial {t.id}", None, False).split("\n## Reproduce")[0]
        path = export_member(data.run.run_dir, t.recipe_hash, out, card_extra=card, overwrite=overwrite)
        return ExportResult(path=path, trial=t, how=how, mergekit=None,
                            mergekit_note="No mergekit config: a model-archive child has no merge recipe.")
    recipe = Recipe.from_dict(t.recipe, where=f"{data.run.run_dir}: trial {t.id} recipe")
    missing = [p for p in recipe.model_paths().values() if not Path(p).exists()]
    if missing:
        raise EvomergeError(f"trial {t.id}: parent model {missing[0]} not found; the run's models must be "
                            "where they were during the search (or rerun from the same directory)")
    text, note = mergekit_yaml(recipe)
    card = card_sections(data, t, how or f"trial {t.id}", note, text is not None)
    path = export_model(recipe, out, Sources.from_recipe(recipe), overwrite=overwrite, progress=progress,
                        shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES, card_extra=card,
                        extra_files={MERGEKIT_FILE: text} if text is not None else None, protect=run_dir)
    mk = path / MERGEKIT_FILE if text is not None else None
    return ExportResult(path=path, trial=t, how=how, mergekit=mk, mergekit_note=note)
