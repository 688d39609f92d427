"""Search: the loop (:mod:`.loop`, typed state), its set-up (:mod:`.setup`), the entry point
(:mod:`.run`) and the registry of search kinds (:mod:`.kinds`): ``space`` (parameter and
layer-flow spaces, :class:`Search`), ``model_archive`` (:mod:`.archive`) and ``map`` (:mod:`.map`).
Nothing below this package imports it."""

from evomerge.search.kinds import KINDS, kind_of, register_kind, search_class
from evomerge.search.loop import LoopState, Progress, Search, SearchSummary
from evomerge.search.setup import (Preflight, check_optimizer, check_tasks, plan_memory, preflight,
                                   register_preflight_check, resolve_models, stage_bounds, stored_models, worker_spec)
from evomerge.search import archive, map  # noqa: E402,F401  (register the search kinds)
from evomerge.search.run import run_search

__all__ = [
    "KINDS", "LoopState", "Preflight", "Progress", "Search", "SearchSummary", "check_optimizer", "check_tasks", "kind_of",
    "plan_memory", "preflight", "register_kind", "register_preflight_check", "resolve_models", "run_search",
    "search_class", "stage_bounds", "stored_models", "worker_spec",
]
