"""Check a search's objectives before anything runs: tasks, splits, metrics and data, in one pass.

``check_objectives`` builds every lm-eval objective's task once in the calling process, so an
unknown task, a split the task does not have, an unknown metric, a missing data file or a Hub
dataset that is not cached fails with one line *before* a run directory is created (the
workers would otherwise fail on every candidate). It returns a :class:`CheckedObjectives`:
which dataset split each objective scores (a role such as ``search`` may stand for the task's
``validation_split``; see :mod:`evomerge.evaluation.tasks`) and the tasks it built, from which
the memory plan measures the longest request (:meth:`CheckedObjectives.longest_request`)
without building them again. It refuses a validation objective that scores the very split a
search objective of the same task scores: validation must be held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluation.objective import Objective


@dataclass
class CheckedObjectives:
    """What :func:`check_objectives` found."""

    #: objective key → the dataset split it scores (validation keys prefixed ``validation/``)
    splits: dict[str, str] = field(default_factory=dict)
    #: every lm-eval objective (search, then validation) with its task, built once
    tasks: list[tuple[Objective, Any]] = field(default_factory=list)
    #: a Python objective is among them (its requests cannot be known ahead)
    python: bool = False

    def longest_request(self, tokenizer) -> int | None:
        """Tokens of the longest sequence a worker evaluates for these objectives — what the
        memory plan sizes the evaluation batch by (docs/scale.md) instead of the model's whole
        context.

        A loglikelihood request (multiple choice included) is its context plus continuation; a
        generation is its context plus ``max_gen_toks`` (lm-eval's default 256 when the task sets
        none); one token is added for a BOS. ``None`` when it cannot be known ahead: a Python
        objective, a rolling loglikelihood, any other request type, no objective at all.
        """
        from evomerge.evaluation._lmeval import quiet

        if self.python or not self.tasks:
            return None
        texts: list[str] = []
        extra: list[int] = []
        for o, task in self.tasks:
            with quiet():
                task.build_all_requests(limit=o.limit, rank=0, world_size=1)
            for inst in task.instances:
                if inst.request_type == "loglikelihood":
                    texts.append(inst.args[0] + inst.args[1])
                    extra.append(1)
                elif inst.request_type == "generate_until":
                    texts.append(inst.args[0])
                    extra.append(1 + int((inst.args[1] or {}).get("max_gen_toks", 256)))
                else:
                    return None
        if not texts:
            return None
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
        return max(n + e for n, e in zip(lengths, extra))


def check_objectives(
    search: Sequence[Objective],
    validation: Sequence[Objective] = (),
    *,
    evals_dir: str | Path | Sequence[str | Path] | None = None,
    builtin_tasks: bool = False,
) -> CheckedObjectives:
    """Build and check every lm-eval objective of ``search`` and ``validation`` (see module
    docstring). Python objectives are not built here (they are imported by the workers)."""
    from evomerge.evaluation.scoring import resolve_metric
    from evomerge.evaluation.tasks import TaskCatalog

    lm = [("", o) for o in search if not o.is_python] + [("validation/", o) for o in validation if not o.is_python]
    out = CheckedObjectives(python=any(o.is_python for o in [*search, *validation]))
    if not lm:
        return out
    catalog = TaskCatalog(evals_dir, builtin_tasks=builtin_tasks)
    chosen = out.splits
    for prefix, o in lm:
        task = catalog.build(o.task, o.split, key=o.key)
        resolve_metric(task, o.key, o.metric)
        chosen[prefix + o.key] = task.config.test_split
        out.tasks.append((o, task))
    searched = {(o.task, chosen[o.key]): o.key for prefix, o in lm if not prefix}
    for o in validation:
        hit = searched.get((o.task, chosen.get("validation/" + o.key)))
        if hit is not None:
            raise ConfigError(
                f"validation objective {o.key} scores the same split ({chosen['validation/' + o.key]!r}) as the "
                f"search objective {hit}; validation must be held out: give it another of the task's splits"
            )
    return out


def check_search_objectives(cfg) -> CheckedObjectives:
    """:func:`check_objectives` of a :class:`~evomerge.config.SearchConfig`: its search objectives
    and the validation objectives it scores, with its ``evaluation.evals_dir`` and
    ``builtin_tasks``."""
    ev = cfg.evaluation
    return check_objectives([o.to_objective() for o in cfg.objectives],
                            [o.to_objective() for o in cfg.scored_validation],
                            evals_dir=ev.evals_dir, builtin_tasks=ev.builtin_tasks)
