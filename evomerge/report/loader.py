"""Run directory → :class:`ReportData`: the only part of the report that knows the run store.

Mapping (see :mod:`evomerge.store`):

* objectives come from the stored config (``meta.config.objectives``); an objective is named by
  its task, and the store's ``task:split`` metric keys map onto that name for the search split
  and for the validation split (``meta.config.validation.objectives``);
* ``kind='reference'`` trials are the parents (``name`` = ``base`` or an expert's alias);
* a trial's optimizer and generation come from its ``info`` (``optimizer``, ``generation``;
  the config's optimizer otherwise); its finish time is ``created`` (commit time) and its
  start ``created − seconds.total_s``;
* the surrogate's predicted front is read from ``meta.predicted_front`` or from
  ``predicted_front.json`` in the run directory: ``{"M": [[...]], "C": [[...]], "names": [...],
  "coefficient_names": [...], "method": "..."}`` (``names`` are objective names or keys).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.report.data import (FAILED, OK, ModelInfo, ObjectiveInfo, PredictedFront, ReportData,
                                  RunFacts, TrialInfo)

PREDICTED_FRONT_FILE = "predicted_front.json"


def _objective_keys(config: dict) -> tuple[list[ObjectiveInfo], dict[str, str], dict[str, str]]:
    """Objectives and the maps store key → objective name for search and validation metrics."""
    objs = config.get("objectives") or []
    tasks = [o.get("task") for o in objs]
    infos, search_map = [], {}
    for o in objs:
        key = f"{o.get('task')}:{o.get('split', 'search')}"
        name = o["task"] if tasks.count(o["task"]) == 1 else key
        infos.append(ObjectiveInfo(name=name, weight=float(o.get("weight", 1.0)), metric=o.get("metric")))
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


def _predicted(run_dir: Path, meta: dict, objectives: list[ObjectiveInfo], search_map: dict) -> PredictedFront | None:
    raw = meta.get("predicted_front")
    where = "meta.predicted_front"
    if raw is None and (run_dir / PREDICTED_FRONT_FILE).is_file():
        where = str(run_dir / PREDICTED_FRONT_FILE)
        try:
            raw = json.loads((run_dir / PREDICTED_FRONT_FILE).read_text())
        except ValueError as e:
            raise ConfigError(f"{where}: malformed JSON ({e})") from None
    if not raw:
        return None
    M = raw.get("M") or raw.get("metrics") or []
    names = [search_map.get(n, n) for n in (raw.get("names") or [])]
    wanted = [o.name for o in objectives]
    if names:
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ConfigError(f"{where}: no predicted values for objective(s) {missing}; it has {names}")
        M = [[row[names.index(n)] for n in wanted] for row in M]
    elif M and len(M[0]) != len(wanted):
        raise ConfigError(f"{where}: rows have {len(M[0])} values for {len(wanted)} objectives and no `names`")
    return PredictedFront(metrics=[[float(v) for v in row] for row in M], coefficients=raw.get("C") or [],
                          coefficient_names=raw.get("coefficient_names") or [],
                          method=raw.get("method") or "surrogate")


def _time(meta: dict, *keys: str) -> float | None:
    for k in keys:
        v = meta.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def _trial_info(t, search_map: dict, val_map: dict, default_optimizer: str | None) -> TrialInfo:
    info = t.info or {}
    total = (t.seconds or {}).get("total_s")
    try:
        recipe = json.loads(t.recipe_json)
    except ValueError:
        recipe = None
    gen = info.get("generation")
    return TrialInfo(
        id=int(t.id), status=OK if t.status == "ok" else FAILED, recipe=recipe, recipe_hash=t.recipe_hash,
        genome=None if t.genome is None else [float(x) for x in t.genome],
        search=_rename(t.metrics, search_map), validation=_rename(t.validation, val_map),
        fitness=t.fitness, optimizer=str(info.get("optimizer") or default_optimizer or "") or None,
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
    items = [_trial_info(t, search_map, val_map, default_optimizer) for t in trials]
    starts = [t.started for t in items if t.started is not None]
    run = RunFacts(
        run_dir=str(run_dir), name=config.get("name") or run_dir.name, config=config, seed=config.get("seed"),
        budget_evaluations=budget.get("evaluations"), budget_seconds=budget.get("wall_time"),
        started=_time(meta, "started", "start_time", "created") or (min(starts) if starts else None),
        finished=_time(meta, "finished", "end_time"),
        space=space.get("type") if isinstance(space, dict) else (str(space) if space else None),
        status=meta.get("status") if isinstance(meta.get("status"), str) else None,
    )
    failed_refs = [f"parent {name} could not be scored: {t.error or 'no reason recorded'}"
                   for name, t in refs.items() if not t.ok]
    run.notes += failed_refs
    data = ReportData(run=run, objectives=objectives, trials=items, models=models)
    data.predicted = _predicted(run_dir, meta, objectives, search_map)
    return data
