"""Find and build lm-eval tasks from evals directories, one split at a time.

**Directories.** A catalog indexes the directories it is given (``evaluation.evals_dir``: one
path or a list; ``--evals-dir`` repeatable) and always the shipped evals directory
(:func:`default_evals_dir`, the zoo's tasks). A task name found in several places comes from
the first one listed; the shipped directory comes after the user's, and lm-eval's own ~10k
built-in tasks (``builtin_tasks=True``, off by default: indexing them costs ~19 s) come last.

**Splits.** An objective names a split: any split of the task's dataset, or one of evomerge's
roles ``search`` / ``validation`` / ``test``. A name the dataset has is used as it is; a role
the dataset lacks maps to the split the task's YAML declares for it: ``search`` and
``validation`` → its ``validation_split``, ``test`` → its ``test_split`` (so a plain lm-eval
task with only ``validation`` and ``test`` splits is searched on ``validation``). Anything else
fails with one line listing the task's splits. :meth:`TaskCatalog.build` overrides
``test_split`` — the split lm-eval scores — with the chosen one.

**Data paths.** Relative ``data_files`` (and a relative local ``dataset_path``) are relative to
the YAML's own directory, nothing else. The plain ``lm_eval`` CLI resolves them against the
current directory, so it reads the same files when run from the YAML's directory; a task using
``custom_dataset: !function evomerge.lm_eval_data.load_dataset`` reads them from anywhere in
both (see :mod:`evomerge.lm_eval_data`).

**Offline.** A task reading a Hugging Face Hub dataset that is not in the local cache fails with
one line naming the task (evomerge never goes online).
"""

from __future__ import annotations

import copy
import glob
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluation import _lmeval
from evomerge.evaluation._lmeval import quiet
from evomerge import paths

import datasets  # noqa: E402  (after _lmeval: offline first)
import datasets.packaged_modules  # noqa: E402
from lm_eval.api.task import ConfigurableTask, Task  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks._index import Kind  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

#: evomerge's split roles → the YAML key naming the task's split for that role (when the
#: dataset has no split of the role's own name).
ROLE_SPLITS = {"search": "validation_split", "validation": "validation_split", "test": "test_split"}


def default_evals_dir() -> Path:
    """The shipped ``evals/`` (package data; see :mod:`evomerge.paths`)."""
    return paths.evals_dir()


def evals_dirs(evals_dir: str | Path | list[str | Path] | tuple | None = None) -> list[Path]:
    """The directories a catalog indexes, in precedence order: the given ones, then the shipped one."""
    given = [] if evals_dir is None else list(evals_dir) if isinstance(evals_dir, (list, tuple)) else [evals_dir]
    out: list[Path] = []
    for d in given:
        p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise EvomergeError(f"{p}: evals directory not found; pass --evals-dir (or evals_dir=) an existing directory")
        if p not in out:
            out.append(p)
    shipped = default_evals_dir().resolve()
    if shipped.is_dir() and shipped not in out:
        out.append(shipped)
    return out


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "(none)"


class TaskCatalog:
    """The lm-eval tasks of some directories (plus the shipped ones), indexed once."""

    def __init__(self, evals_dir: str | Path | list | None = None, *, builtin_tasks: bool = False):
        self.roots = evals_dirs(evals_dir)
        self.builtin_tasks = bool(builtin_tasks)
        if not self.roots and not self.builtin_tasks:
            raise EvomergeError("no evals directory: pass --evals-dir (or evals_dir=)")
        with quiet():
            # lm-eval lets later paths override earlier ones: pass ours in reverse precedence.
            # include_defaults: lm-eval's own ~10k YAMLs cost ~19 s to index; ours ~2 ms.
            self._tm = TaskManager(include_path=[str(p) for p in reversed(self.roots)] or None,
                                   include_defaults=self.builtin_tasks)

    @property
    def root(self) -> Path:
        """The first (highest-precedence) directory."""
        return self.roots[0]

    def _where(self) -> str:
        where = ", ".join(map(str, self.roots))
        return where + (" and lm-eval's built-in tasks" if self.builtin_tasks else "")

    @property
    def names(self) -> list[str]:
        """Every task name (not groups or tags)."""
        return sorted(n for n, e in self._tm.task_index.items() if e.kind in (Kind.TASK, Kind.PY_TASK))

    def _entry(self, name: str):
        entry = self._tm.task_index.get(name)
        if entry is None:
            names = self.names
            shown = _listing(names) if len(names) <= 40 else _listing(names[:40]) + f", … ({len(names)} in all)"
            hint = "" if self.builtin_tasks else " (lm-eval's built-in tasks: set evaluation.builtin_tasks / --builtin-tasks)"
            raise EvomergeError(f"unknown task {name!r} in {self._where()}{hint}; tasks there: {shown}")
        if entry.kind not in (Kind.TASK, Kind.PY_TASK) or entry.yaml_path is None:
            raise EvomergeError(
                f"{name!r} in {self._where()} is a {entry.kind.name.lower()}, not a task; "
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
        """Build the task scoring ``split`` (a split name or role, see the module docstring);
        its lm-eval name becomes ``key`` (unique per split). ``task.config.test_split`` is the
        dataset split it scores."""
        cfg = self.config(name)
        kwargs = cfg.get("dataset_kwargs") or {}
        if cfg.get("dataset_path") and not callable(cfg.get("custom_dataset")):
            kwargs.setdefault("cache_dir", str(_lmeval.datasets_cache_dir()))
            cfg["dataset_kwargs"] = kwargs
        cfg["task"] = key or name
        files = kwargs.get("data_files")
        if isinstance(files, dict):  # the splits are known without loading anything
            cfg["test_split"] = _pick_split(name, split, cfg, list(files))
            return _construct(cfg, name)
        cfg["test_split"] = split
        try:
            return _construct(cfg, name)
        except KeyError:
            pass
        # Splits decided by the dataset itself (custom_dataset, a dataset dir, the Hub): list them.
        available = _dataset_splits(cfg, name)
        chosen = _pick_split(name, split, cfg, available)
        if chosen == split:  # the split exists: the KeyError came from elsewhere in the task
            raise EvomergeError(f"task {name!r} cannot be built on split {split!r} (a KeyError inside lm-eval); "
                                "check the task's YAML (doc_to_text, process_docs, ...)")
        cfg["test_split"] = chosen
        return _construct(cfg, name)


def _pick_split(task: str, split: str, cfg: dict[str, Any], available: list[str]) -> str:
    """``split`` itself when the dataset has it, else the split its role maps to (ROLE_SPLITS)."""
    if split in available:
        return split
    declared = cfg.get(ROLE_SPLITS[split]) if split in ROLE_SPLITS else None
    if declared is not None and declared in available:
        return declared
    via = ""
    if split in ROLE_SPLITS:
        role_key = ROLE_SPLITS[split]
        via = (f" and no {role_key} to stand in for it" if declared is None
               else f", nor its {role_key} {declared!r}" if declared != split else "")
    raise EvomergeError(f"task {task!r} has no split {split!r}{via}; its splits: {_listing(available)} "
                        "(set the objective's split to one of them)")


FEWSHOT_SEED = 1234  # lm-eval's default, so few-shot prompts match the plain lm_eval CLI


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_hub_dataset(cfg: dict[str, Any]) -> bool:
    """Whether the task reads a Hugging Face Hub dataset (not a local path, builder or function)."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or callable(cfg.get("custom_dataset")):
        return False
    return path not in datasets.packaged_modules._PACKAGED_DATASETS_MODULES and not Path(path).expanduser().exists()


def _dataset_error(e: Exception, cfg: dict[str, Any], name: str) -> EvomergeError:
    """One line for a dataset that would not load; a Hub dataset missing offline says so."""
    if is_hub_dataset(cfg):
        return EvomergeError(
            f"task {name!r} reads the Hugging Face Hub dataset {cfg['dataset_path']!r}, which is not in "
            f"the local cache ({_lmeval.datasets_cache_dir()}) and evomerge never goes online: download it "
            "there once with network access, or point the task at a local copy (dataset_kwargs.data_files)"
        )
    return EvomergeError(f"task {name!r}: cannot load its dataset ({type(e).__name__}: {_first_line(e)})")


def _construct(cfg: dict[str, Any], name: str) -> Task:
    try:
        with quiet():
            task = cfg["class"](config=cfg) if "class" in cfg else ConfigurableTask(config=cfg)
    except (KeyError, EvomergeError):
        raise  # KeyError: a missing split, the caller lists the splits
    except Exception as e:
        raise _dataset_error(e, cfg, name) from None
    task.set_fewshot_seed(FEWSHOT_SEED)
    return task


def _dataset_splits(cfg: dict[str, Any], name: str) -> list[str]:
    """The split names of the task's dataset, loaded the way lm-eval loads it (``Task.download``)."""
    kwargs = cfg.get("dataset_kwargs") or {}
    try:
        with quiet():
            if callable(cfg.get("custom_dataset")):
                data = cfg["custom_dataset"](**(cfg.get("metadata") or {}), **kwargs)
            else:
                data = datasets.load_dataset(path=cfg.get("dataset_path"), name=cfg.get("dataset_name"), **kwargs)
    except EvomergeError:
        raise
    except Exception as e:
        raise _dataset_error(e, cfg, name) from None
    return list(data) if isinstance(data, dict) else []


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
    """A data file relative to the YAML's directory ``base`` (globs allowed), made absolute."""
    if not isinstance(value, str) or "://" in value:
        return value
    p = Path(value).expanduser()
    cand = p if p.is_absolute() else base / p
    if cand.exists():
        return str(cand.resolve())
    if glob.glob(str(cand)):
        return str(cand)
    raise EvomergeError(f"task {task!r}: data file {value!r} not found (relative data files are relative to "
                        f"the task's YAML, here {base})")
