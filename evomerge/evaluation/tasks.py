"""Find and build lm-eval tasks from an ``evals/`` directory, one split at a time.

Split selection: one YAML per task whose dataset holds every split (``search`` / ``validation``
/ ``test``), either as keys of ``dataset_kwargs.data_files`` or as the splits a
``custom_dataset`` function returns (the zoo's ``evals/zoo_utils.py``). :meth:`TaskCatalog.build`
overrides ``test_split`` — the split lm-eval scores — with the one asked for; the plain
``lm_eval`` CLI scores whatever ``test_split`` the YAML names.

Relative ``data_files`` (and a relative local ``dataset_path``) are resolved against the YAML's
own directory, then the current directory, so that tasks load from anywhere.
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluation import _lmeval
from evomerge.evaluation._lmeval import quiet

from lm_eval.api.task import ConfigurableTask, Task  # noqa: E402  (after _lmeval: offline first)
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._index import Kind  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402


def default_evals_dir() -> Path:
    """The repository's ``evals/`` (next to the ``evomerge`` package)."""
    return Path(__file__).resolve().parents[2] / "evals"


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "(none)"


class TaskCatalog:
    """The lm-eval tasks under one directory, indexed once without lm-eval's built-in tasks."""

    def __init__(self, evals_dir: str | Path | None = None):
        self.root = Path(evals_dir or default_evals_dir()).expanduser().resolve()
        if not self.root.is_dir():
            raise EvomergeError(f"{self.root}: evals directory not found; pass --evals-dir (or evals_dir=)")
        with quiet():
            # include_defaults=False: indexing lm-eval's own ~10k YAMLs costs ~19 s; ours ~2 ms.
            self._tm = TaskManager(include_path=str(self.root), include_defaults=False)

    @property
    def names(self) -> list[str]:
        """Every task name (not groups or tags)."""
        return sorted(n for n, e in self._tm.task_index.items() if e.kind in (Kind.TASK, Kind.PY_TASK))

    def _entry(self, name: str):
        entry = self._tm.task_index.get(name)
        if entry is None:
            raise EvomergeError(f"unknown task {name!r} in {self.root}; tasks there: {_listing(self.names)}")
        if entry.kind not in (Kind.TASK, Kind.PY_TASK) or entry.yaml_path is None:
            raise EvomergeError(
                f"{name!r} in {self.root} is a {entry.kind.name.lower()}, not a task; "
                f"name one task per objective: {_listing(self.names)}"
            )
        return entry

    def config(self, name: str) -> dict[str, Any]:
        """The task's full config (includes merged, ``!function`` resolved, paths absolute)."""
        entry = self._entry(name)
        try:
            cfg = copy.deepcopy(load_yaml(entry.yaml_path, resolve_func=True))
        except Exception as e:  # a broken YAML or a missing !function module
            raise EvomergeError(f"{entry.yaml_path}: cannot load task {name!r}: {' '.join(str(e).split())}; "
                                 "fix the task file") from None
        for key in ("tag", "group", "task_list"):
            cfg.pop(key, None)
        meta = cfg.get("metadata")
        cfg["metadata"] = {**(meta if isinstance(meta, dict) else {}), "config_source": str(entry.yaml_path)}
        _resolve_data_paths(cfg, Path(entry.yaml_path).parent, name)
        return cfg

    def build(self, name: str, split: str, *, key: str | None = None) -> Task:
        """Build the task scoring ``split``; its lm-eval name becomes ``key`` (unique per split)."""
        cfg = self.config(name)
        kwargs = cfg.get("dataset_kwargs") or {}
        if cfg.get("dataset_path") and not callable(cfg.get("custom_dataset")):
            kwargs.setdefault("cache_dir", str(_lmeval.datasets_cache_dir()))
            cfg["dataset_kwargs"] = kwargs
        cfg["task"] = key or name
        files = kwargs.get("data_files")
        if isinstance(files, dict) and split not in files:
            raise EvomergeError(f"task {name!r} has no split {split!r}; its splits: {_listing(files)}")
        cfg["test_split"] = split
        try:
            return _construct(cfg)
        except KeyError:
            if isinstance(files, dict):
                raise
            # Splits decided by the dataset itself (custom_dataset, a dataset dir): list them now.
            default = self.config(name)
            default["task"] = cfg["task"]
            available = list(getattr(_construct(default), "dataset", None) or [])
            if split in available:
                raise
            raise EvomergeError(f"task {name!r} has no split {split!r}; its splits: {_listing(available)}") from None


FEWSHOT_SEED = 1234  # lm-eval's default, so few-shot prompts match the plain lm_eval CLI


def _construct(cfg: dict[str, Any]) -> Task:
    with quiet():
        task = cfg["class"](config=cfg) if "class" in cfg else ConfigurableTask(config=cfg)
    task.set_fewshot_seed(FEWSHOT_SEED)
    return task


def _resolve_data_paths(cfg: dict[str, Any], base: Path, task: str) -> None:
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        files = kwargs["data_files"]
        if isinstance(files, dict):
            kwargs["data_files"] = {k: _resolve_files(v, base, task) for k, v in files.items()}
        else:
            kwargs["data_files"] = _resolve_files(files, base, task)
    path = cfg.get("dataset_path")
    if isinstance(path, str) and not Path(path).is_absolute() and (base / path).exists():
        cfg["dataset_path"] = str((base / path).resolve())


def _resolve_files(value, base: Path, task: str):
    if isinstance(value, (list, tuple)):
        return [_resolve_one(v, base, task) for v in value]
    return _resolve_one(value, base, task)


def _resolve_one(value: str, base: Path, task: str) -> str:
    if not isinstance(value, str) or "://" in value:
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    for root in (base, Path.cwd()):
        cand = root / p
        if cand.exists() or glob.glob(str(cand)):
            return str(cand.resolve()) if cand.exists() else str(cand)
    raise EvomergeError(f"task {task!r}: data file {value!r} not found (looked in {base} and {Path.cwd()})")
