"""The model-archive search kind: M2N2 on whole weights (the paper's setting).

Selected by ``space: model_archive`` with ``optimizer: m2n2`` (docs/search.md). Members of the
archive are whole models; the initial members are the parents (see
:mod:`evomerge.spaces.model_archive`), a child is a weight :class:`~evomerge.lineage.Lineage`.
The trial's ``info`` adds the parents' trial ids. The worker (:class:`ArchiveWorker`) writes each
child it computes to ``RUN_DIR/archive/<hash>.safetensors`` before evaluating it, and after each
checkpoint the loop deletes the files no longer needed (not a member, not a pending candidate,
not a pending candidate's parent). After a kill -9 the members' files are there; anything missing
is recomputed from the lineage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evomerge.errors import ConfigError
from evomerge.executors.worker import ModelWorker
from evomerge.lineage import ArchiveWeights, Lineage, float_names, load_into, parse_lineage, store_lineage
from evomerge.optimizers.m2n2 import ArchiveM2N2
from evomerge.search.kinds import register_kind
from evomerge.search.loop import LoopState, Search
from evomerge.search.setup import resolve_models, stored_models, worker_spec

M2N2_OPTIONS = ("archive_size", "alpha", "attraction", "splitpoint", "mutation")
WORKER = "evomerge.search.archive:ArchiveWorker"


class ArchiveWorker(ModelWorker):
    """:class:`~evomerge.executors.worker.ModelWorker` that also materialises lineages.

    ``spec.options``: ``run_dir``, ``sources`` (initial member hash → alias), ``cache``.
    """

    def __init__(self, spec, name):
        super().__init__(spec, name)
        o = spec.options
        self.names = float_names(self.sources.reference)
        self._store = None
        self.archive = ArchiveWeights(o["run_dir"], self.names, o["sources"], self.sources.get,
                                      self._lineage_of, self.device, o.get("cache") or 8)

    def _lineage_of(self, h: str) -> Lineage | None:
        from evomerge.store import RunStore

        if self._store is None:
            self._store = RunStore(self.archive.dir.parent)
        return store_lineage(self._store)(h)

    def materialize(self, task) -> float:
        lin = parse_lineage(task.recipe_json)
        if lin is None:
            return super().materialize(task)
        t0 = time.perf_counter()
        tensors = self.archive.get(lin.hash(), lineage=lin, save=True)
        load_into(self.model, self.names, tensors)
        return time.perf_counter() - t0



@dataclass
class ArchiveState(LoopState):
    """:class:`LoopState` plus the archive: member ask id → hash, parents of outstanding children
    (ask id → parent hashes), and the replacement events (for the report)."""

    members: dict = field(default_factory=dict)
    child_parents: dict = field(default_factory=dict)
    events: list = field(default_factory=list)


def archive_optimizer(cfg, sources: int, elements: int, seed: int) -> ArchiveM2N2:
    unknown = sorted(set(cfg.optimizer.options) - set(M2N2_OPTIONS))
    if unknown:
        raise ConfigError(f"optimizer.options: {', '.join(unknown)} not used by a model_archive search; "
                          f"valid: {', '.join(M2N2_OPTIONS)}")
    return ArchiveM2N2(sources, elements, seed, **cfg.optimizer.options)



def model_elements(pool) -> int:
    """Floating-point elements of one model of the pool (the genome length M2N2 splits)."""
    from evomerge.models import ModelDir

    ref = ModelDir(pool.base if pool.base is not None else pool.experts[0].model)
    return sum(int(np.prod(ref.shape(n))) for n in float_names(ref))


@register_kind("model_archive", spaces=("model_archive",))
class ArchiveSearch(Search):
    """:class:`~evomerge.search.Search` with children as weight lineages (see module docstring)."""

    state_type = ArchiveState

    def __init__(self, cfg, store, *, executor=None, on_progress=None, pool=None, allow_pickle=False, plan=None):
        from evomerge.executors import make_executor
        from evomerge.spaces import make_space

        pool = pool or stored_models(store) or resolve_models(cfg)
        space = make_space(cfg.space, pool)
        self.source_hashes = {space.recipes[a].hash(): a for a in space.members}
        self.elements = model_elements(pool)
        self.archive_size = int(cfg.optimizer.options.get("archive_size", 20))
        spec = worker_spec(cfg, pool, plan)
        spec.factory = WORKER
        spec.options = {"run_dir": str(Path(store.run_dir).resolve()), "sources": self.source_hashes,
                        "cache": space.config.cache or self.archive_size + 2}
        own = executor is None
        if executor is not None and getattr(executor.spec, "factory", None) != spec.factory:
            raise ConfigError(f"model_archive: a caller's executor must run {WORKER} "
                              "(build it from evomerge.search.archive's worker spec) or pass none")
        super().__init__(cfg, store, executor=executor or make_executor(cfg.executor, spec),
                         on_progress=on_progress, pool=pool, allow_pickle=allow_pickle)
        self._own_executor = own
        self.files = ArchiveWeights(store.run_dir, [], self.source_hashes, None, store_lineage(store))
        store.set_meta(archive={"sources": self.source_hashes, "elements": self.elements,
                                "members": list(space.members)})

    @classmethod
    def check(cls, pf) -> None:
        archive_optimizer(pf.cfg, len(pf.space.members), model_elements(pf.pool), pf.cfg.seed)

    def _new_optimizer(self, stage: int, fixed: np.ndarray):
        return archive_optimizer(self.cfg, len(self.space.members), self.elements, self.cfg.seed + stage)

    def _recipe_for(self, a, genome: np.ndarray):
        if a.info.get("source") != "child":
            return self.space.to_recipe(genome)
        members, known = self.state.members, self.state.child_parents
        # a re-issued ask (after resume) keeps the parents it had, even if they left the archive since
        parents = tuple(known.get(a.id) or (members[i] for i in a.info["parents"]))
        known[a.id] = parents
        lin = Lineage(parents=parents, split=int(a.info["split"]), w=float(a.info["w"]),
                      mutation=float(a.info.get("mutation", 0.0)), seed=int(a.info.get("mutation_seed", 0)))
        a.info["parent_hashes"] = list(parents)
        a.info["parent_trials"] = [getattr(self.store.get(h), "id", None) for h in parents]
        return lin

    def _tell(self, p) -> None:
        super()._tell(p)
        self.state.child_parents.pop(p.ask.id, None)
        ev, members = self.opt.last_event, self.state.members
        if ev.get("id") != p.ask.id:
            return
        if ev.get("action") in ("added", "replaced"):
            if ev["action"] == "replaced":
                members.pop(ev["dropped"], None)
            members[p.ask.id] = p.hash
        self.state.events.append({"seq": p.seq, "hash": p.hash, "action": ev.get("action"),
                                     "dropped_ask": ev.get("dropped")})

    def _checkpoint(self) -> None:
        super()._checkpoint()  # durable first: only then may files of the old state go
        members = [{"ask": i, "hash": h, "trial": getattr(self.store.get(h), "id", None)}
                   for i, h in sorted(self.state.members.items())]
        self.store.set_meta(archive_members=members, archive_events=self.state.events)
        keep = set(self.state.members.values())
        for p in self.pending.values():
            keep.add(p.hash)
            lin = parse_lineage(p.recipe_json)
            if lin is not None:
                keep.update(lin.parents)
        self.files.collect(keep)

    def archive_members(self) -> dict[int, str]:
        """Current members: ask id → hash (a parent's recipe hash for an initial member)."""
        return dict(self.state.members)


