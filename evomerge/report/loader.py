"""Run directory → :class:`ReportData`: the only part of the report that knows the run store.

Mapping (see :mod:`evomerge.store` and :mod:`evomerge.search`):

* objectives come from the stored config (``meta.config.objectives``); an objective is named by
  its task, and the store's ``task:split`` metric keys map onto that name for the search split
  and for the validation split (``meta.config.validation.objectives``). A negative weight means
  the search minimised that objective (fitness = Σ weight · value), so it is one to minimise;
* ``kind='reference'`` trials are the parents (``name`` = ``base`` or an expert's alias);
* a trial's optimizer is the config's (with the stage name when the space has several stages),
  its generation and provenance come from ``info`` (``generation``, ``source``); it finished at
  ``created`` (commit time) and started ``seconds.total_s`` earlier;
* run facts: ``meta.created`` (start), ``meta.updated`` (last status change), ``meta.elapsed``
  (search wall time over all sessions), ``meta.status``, ``meta.stopped``, ``meta.space``;
* the surrogate's predicted front is the MAP summary in ``meta.map``
  (:func:`evomerge.search.map.save_map_summary`): ``front.M`` (raw metric values, in
  the order of ``objectives`` keys), ``front.C`` over ``genes``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from evomerge.errors import ConfigError, EvomergeError
from evomerge.report.data import (FAILED, OK, ModelInfo, ObjectiveInfo, PredictedFront, ReportData,
                                  RunFacts, TrialInfo)

def _objective_keys(config: dict) -> tuple[list[ObjectiveInfo], dict[str, str], dict[str, str]]:
    """Objectives and the maps store key → objective name for search and validation metrics."""
    objs = config.get("objectives") or []
    tasks = [o.get("task") for o in objs]
    infos, search_map = [], {}
    for o in objs:
        key = f"{o.get('task')}:{o.get('split', 'search')}"
        name = o["task"] if tasks.count(o["task"]) == 1 else key
        weight = float(o.get("weight", 1.0))
        infos.append(ObjectiveInfo(name=name, weight=abs(weight), metric=o.get("metric"),
                                   direction="minimize" if weight < 0 else "maximize"))
        search_map[key] = name
    val = config.get("validation") or {}
    vobjs = val.get("objectives", []) if isinstance(val, dict) else val
    val_map = {}
    for o in vobjs or []:
        key = f"{o.get('task')}:{o.get('split', 'validation')}"
        val_map[key] = o["task"] if o["task"] in search_map.values() else key
    return infos, search_map, val_map


def _rename(metrics: dict | None, mapping: dict[str, str]) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[mapping.get(k, k)] = float(v)
    return out


def _num_blocks(path: str) -> int | None:
    try:
        from evomerge.models import ModelDir

        return ModelDir(path).num_blocks
    except Exception:  # a model moved since the run: the report still works, with fewer details
        return None


def _models(config: dict, refs: dict, trials: list) -> list[dict[str, str]]:
    """(alias, path, role) of the parents: from the config, else from a stored recipe (zoo runs)."""
    mc = config.get("models") or {}
    out = []
    if mc.get("base"):
        out.append({"alias": "base", "path": mc["base"], "role": "base"})
    for e in mc.get("experts") or []:
        spec = {"model": e} if isinstance(e, str) else e
        out.append({"alias": spec.get("name") or Path(spec["model"]).name, "path": spec["model"], "role": "expert"})
    if out:
        return out
    for t in [*refs.values(), *trials]:
        try:
            paths = json.loads(t.recipe_json)
        except ValueError:
            continue
        recipe_paths = {m.get("name") or Path(m["model"]).name: m["model"] for m in paths.get("models", [])}
        if paths.get("base_model"):
            out.append({"alias": "base", "path": paths["base_model"], "role": "base"})
        out += [{"alias": a, "path": p, "role": "expert"} for a, p in recipe_paths.items()]
        return out
    return out


def _predicted(meta: dict, objectives: list[ObjectiveInfo], search_map: dict) -> PredictedFront | None:
    """The MAP summary's predicted front, columns reordered to the report's objectives."""
    summary = meta.get("map")
    front = summary.get("front") if isinstance(summary, dict) else None
    if not front or not front.get("M"):
        return None
    names = [search_map.get(k, k) for k in summary.get("objectives") or []]
    wanted = [o.name for o in objectives]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise ConfigError(f"meta.map: the predicted front has no values for objective(s) {missing}; it has {names}")
    M = [[float(row[names.index(n)]) for n in wanted] for row in front["M"]]
    kind = summary.get("kind")
    return PredictedFront(metrics=M, coefficients=front.get("C") or [], coefficient_names=summary.get("genes") or [],
                          method=f"MAP {kind}" if kind else "MAP")


def _map_note(meta: dict, search_map: dict) -> list[str]:
    summary = meta.get("map")
    if not isinstance(summary, dict) or not summary.get("r2"):
        return []
    names = [search_map.get(k, k) for k in summary.get("objectives") or []]
    fits = ", ".join(f"{n} R²={r:.3f}" for n, r in zip(names, summary["r2"]))
    n = summary.get("n_evaluations")
    return [f"MAP surrogate fit ({summary.get('kind', 'map')}{f', {n} evaluations' if n else ''}): {fits}"]


def _time(meta: dict, *keys: str) -> float | None:
    for k in keys:
        v = meta.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _trial_info(t, search_map: dict, val_map: dict, default_optimizer: str | None, stages: list) -> TrialInfo:
    info = t.info or {}
    total = (t.seconds or {}).get("total_s")
    try:
        recipe = json.loads(t.recipe_json)
    except ValueError:
        recipe = None
    gen = info.get("generation")
    optimizer = str(info.get("optimizer") or default_optimizer or "") or None
    if len(stages) > 1 and t.stage is not None and 0 <= t.stage < len(stages):
        optimizer = f"{optimizer or 'search'} · {stages[t.stage]}"
    return TrialInfo(
        id=int(t.id), status=OK if t.status == "ok" else FAILED, recipe=recipe, recipe_hash=t.recipe_hash,
        genome=None if t.genome is None else [float(x) for x in t.genome],
        search=_rename(t.metrics, search_map), validation=_rename(t.validation, val_map),
        fitness=t.fitness, optimizer=optimizer,
        generation=int(gen) if isinstance(gen, (int, float)) and not isinstance(gen, bool) else None,
        started=(t.created - float(total)) if isinstance(total, (int, float)) else None, finished=t.created,
        error=t.error, source=info.get("source"),
    )


def load_report_data(run_dir: str | Path) -> ReportData:
    """Read a run directory's store into :class:`ReportData` (read-only; safe while a search runs)."""
    from evomerge.store import RunStore

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvomergeError(f"{run_dir}: run directory not found")
    with RunStore(run_dir) as store:
        meta = store.all_meta()
        refs = store.references()
        trials = store.trials(kind="search")
    config = meta.get("config") or {}
    if not isinstance(config, dict) or not config.get("objectives"):
        raise ConfigError(f"{run_dir}: the run store has no config with objectives; was the search started?")
    objectives, search_map, val_map = _objective_keys(config)
    opt = config.get("optimizer")
    default_optimizer = opt.get("name") if isinstance(opt, dict) else opt

    models = []
    for m in _models(config, refs, trials):
        ref = refs.get(m["alias"])
        models.append(ModelInfo(
            alias=m["alias"], path=m["path"], role=m["role"], num_blocks=_num_blocks(m["path"]),
            search=_rename(ref.metrics, search_map) if ref is not None and ref.ok else {},
            validation=_rename(ref.validation, val_map) if ref is not None and ref.ok else {}))

    space = config.get("space")
    budget = config.get("budget") or {}
    stages = meta.get("stages") if isinstance(meta.get("stages"), list) else []
    items = [_trial_info(t, search_map, val_map, default_optimizer, stages) for t in trials]
    starts = [t.started for t in items if t.started is not None]
    status = meta.get("status") if isinstance(meta.get("status"), str) else None
    run = RunFacts(
        run_dir=str(run_dir), name=meta.get("name") or config.get("name") or run_dir.name, config=config,
        seed=config.get("seed"), budget_evaluations=budget.get("evaluations"), budget_seconds=budget.get("wall_time"),
        started=_time(meta, "created") or (min(starts) if starts else None),
        finished=_time(meta, "updated") if status not in (None, "new", "running") else None,
        elapsed=_time(meta, "elapsed"),
        space=meta.get("space") if isinstance(meta.get("space"), str) else
        (space.get("type") if isinstance(space, dict) else (str(space) if space else None)),
        status=status,
    )
    if meta.get("stopped"):
        run.notes.append(f"stopped: {meta['stopped']}")
    run.notes += _map_note(meta, search_map)
    failed_refs = [f"parent {name} could not be scored: {t.error or 'no reason recorded'}"
                   for name, t in refs.items() if not t.ok]
    run.notes += failed_refs
    data = ReportData(run=run, objectives=objectives, trials=items, models=models)
    data.predicted = _predicted(meta, objectives, search_map)
    return data
