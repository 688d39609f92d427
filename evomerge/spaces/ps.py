"""Parameter-space (PS) search: operator parameters per expert and per layer group.

After Akiba et al. 2024 (docs/ALGORITHMS.md §2): one merge operator (TIES with DARE by default), and
for every expert ``k``, every searched parameter ``p`` (weight, density) and every *group* of
tensors one gene. Groups come from the granularity:

* ``global`` — one value for the whole model (a scalar in the recipe);
* ``block`` — the embeddings, each run of ``block_size`` consecutive blocks, the head;
* ``layer`` — the embeddings, every block, the head (``block`` with ``block_size: 1``).

``embed_head: blocks`` drops the embedding and head genes: the embeddings take the first block
group's values and the head (with the final norm) the last group's. That is mergekit-evolve's
genome (``layer_granularity``: mergekit attributes the tensors before the first layer to the
first slice and those after the last layer to the last slice), so a search here can be compared
gene for gene with one run there. The default, ``own``, gives them genes of their own.

With ``filters`` (e.g. ``[self_attn, mlp]``) each filter gets its own block genes and the other
tensors (norms, embeddings, head) a "rest" set, written as mergekit-style ``{filter, value}``
lists. Genes are ordered parameter → expert → filter → group.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import ConfigError
from evomerge.merge.methods import get_operator
from evomerge.recipe import FilteredValue, GroupValues, InputModel, Recipe, TensorSite, resolve
from evomerge.spaces.base import ModelPool, Space, SpaceConfig, register_space

# Default search range and start of well-known per-model parameters. Weights may exceed 1: in
# the zoo exploration the only merge that beat both parents needed a coefficient of 1.5.
DEFAULT_PARAMS: dict[str, tuple[tuple[float, float], float]] = {
    "weight": ((0.0, 2.0), 0.5),
    "density": ((0.0, 1.0), 0.5),
    "tall_lambda": ((0.0, 2.0), 1.0),  # consensus
    # global (operator-wide) parameters: one gene per layer group, shared by the experts
    "t": ((0.0, 1.0), 0.5),  # slerp, nearswap
    "lambda": ((0.0, 2.0), 1.0),
    "select_topk": ((0.0, 1.0), 0.5),  # sce
    "alpha": ((0.0, 2.0), 0.5),  # LiNeS
    "beta": ((0.0, 2.0), 0.5),
}
SHARED = "*"  # the "expert" of a global parameter's genes
REST = None  # filter of the catch-all entry


class ParamSpec(BaseModel):
    """Search range and start of one per-model parameter (defaults: DEFAULT_PARAMS)."""

    model_config = ConfigDict(extra="forbid")
    bounds: tuple[float, float] | None = None
    init: float | None = None


class PSConfig(SpaceConfig):
    type: Literal["ps"] = "ps"
    operator: str = "dare_ties"
    parameters: dict[str, ParamSpec | None] | None = None
    fixed: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    granularity: Literal["global", "block", "layer"] = "layer"
    block_size: int = Field(default=4, ge=1)
    embed_head: Literal["own", "blocks"] = "own"  # blocks: mergekit-evolve's genome (no genes of their own)
    filters: list[str] = Field(default_factory=list)
    experts: list[str] | None = None

    def merge_methods(self) -> tuple[str, ...]:
        return (self.operator,)

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        if any(not f for f in v):
            raise ValueError("filters must be non-empty strings such as self_attn or mlp")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated filter in {v}")
        return v


class Group:
    """A set of tensor sites sharing one gene: ``embed``, blocks ``[lo, hi)``, ``head`` or ``all``."""

    def __init__(self, kind: str, lo: int = 0, hi: int = 0):
        self.kind, self.lo, self.hi = kind, lo, hi

    @property
    def label(self) -> str:
        if self.kind != "blocks":
            return self.kind
        return f"layers.{self.lo}" if self.hi - self.lo == 1 else f"layers.{self.lo}-{self.hi - 1}"

    def sites(self, num_blocks: int, suffix: str) -> list[TensorSite]:
        """Representative tensor sites, named so that filters see ``suffix`` in block tensors."""
        embed = TensorSite(name="model.embed_tokens.weight", group="embed", num_blocks=num_blocks)
        head = TensorSite(name="lm_head.weight", group="head", num_blocks=num_blocks)
        blocks = [
            TensorSite(name=f"model.layers.{i}.{suffix}", group=f"layers.{i}", block=i, num_blocks=num_blocks)
            for i in range(self.lo if self.kind == "blocks" else 0,
                           self.hi if self.kind == "blocks" else num_blocks)
        ]
        return {"embed": [embed], "head": [head], "blocks": blocks, "all": [embed, *blocks, head]}[self.kind]


def make_groups(granularity: str, block_size: int, num_blocks: int, embed_head: str = "own") -> list[Group]:
    """The gene groups; with ``embed_head="blocks"`` no embed/head groups (they follow the end blocks)."""
    if granularity == "global":
        return [Group("all")]
    k = 1 if granularity == "layer" else block_size
    blocks = [Group("blocks", lo, min(lo + k, num_blocks)) for lo in range(0, num_blocks, k)]
    return blocks if embed_head == "blocks" else [Group("embed"), *blocks, Group("head")]


@register_space("ps", PSConfig)
class PSSpace(Space):
    REST_SUFFIX = "~rest"  # name of the representative "other" tensor inside a block

    def __init__(self, config: PSConfig, pool: ModelPool):
        super().__init__(config, pool)
        self.operator = get_operator(config.operator)
        if self.operator.needs_base and pool.base is None:
            raise ConfigError(f"space.operator {config.operator!r} needs a base model; set models.base")
        self.experts = self._experts(config, pool)
        n = len(self.experts)
        if n < self.operator.min_models or (self.operator.max_models is not None and n > self.operator.max_models):
            hi = self.operator.max_models if self.operator.max_models is not None else "any"
            raise ConfigError(
                f"space.operator {config.operator!r} merges {self.operator.min_models}..{hi} models, got {n}"
            )
        self.num_blocks = pool.reference_blocks
        deeper = [e for e in self.experts if pool.num_blocks[e] != self.num_blocks]
        if deeper:
            raise ConfigError(
                f"space: a parameter-space merge needs models of equal depth; {deeper[0]} has "
                f"{pool.num_blocks[deeper[0]]} blocks, the base {self.num_blocks} (use a dfs space to stack layers)"
            )
        self.params = self._params(config)
        for f in config.filters:
            if f in f"model.layers.0.{self.REST_SUFFIX}":
                raise ConfigError(f"space.filters: {f!r} would match every block tensor; use a narrower filter")
        if config.embed_head == "blocks" and config.granularity == "global":
            raise ConfigError("space.embed_head: blocks ties the embeddings and head to the end blocks; "
                              "use it with granularity block or layer")
        self.groups = make_groups(config.granularity, config.block_size, self.num_blocks, config.embed_head)
        self.filters: list[str | None] = [*config.filters, REST] if config.filters else [REST]

        lower, upper, x0, names, self._index = [], [], [], [], {}
        for p, ((lo, hi), init) in self.params.items():
            for e in self._owners(p):
                for f in self.filters:
                    for g in self._groups_for(f):
                        self._index[(p, e, f, g.label)] = len(names)
                        lower.append(lo), upper.append(hi), x0.append(init)
                        fl = "" if f is REST and not config.filters else f".{f if f is not REST else 'rest'}"
                        names.append(f"{p}{'' if e == SHARED else f'[{e}]'}{fl}.{g.label}")
        self._finish(lower, upper, x0, names)

    def _owners(self, p: str) -> list[str]:
        """Whose genes parameter ``p`` has: every expert's, or one shared set for a global one."""
        return self.experts if p in self.operator.model_params else [SHARED]

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _experts(config: PSConfig, pool: ModelPool) -> list[str]:
        if config.experts is None:
            return pool.expert_aliases
        unknown = [a for a in config.experts if a not in pool.expert_aliases]
        if unknown:
            raise ConfigError(f"space.experts: {unknown} not among the experts {pool.expert_aliases}")
        return list(config.experts)

    def _params(self, config: PSConfig) -> dict[str, tuple[tuple[float, float], float]]:
        op = self.operator
        set_elsewhere = set(config.fixed) | set(config.options)
        names = list(config.parameters) if config.parameters is not None else [
            p for p in op.model_params if p in DEFAULT_PARAMS and p not in set_elsewhere
        ] + [p for p, d in op.global_params.items() if d is None and p in DEFAULT_PARAMS and p not in set_elsewhere]
        if not names:
            raise ConfigError(f"space.parameters: operator {op.name!r} has nothing to search; list parameters")
        out = {}
        numeric_globals = {p for p, d in op.global_params.items()
                           if p not in op.choices and not isinstance(d, (bool, str))}
        for p in names:
            if p not in op.model_params and p not in numeric_globals:
                raise ConfigError(
                    f"space.parameters.{p}: not a parameter of {op.name!r} that can be searched (it has "
                    f"{sorted(set(op.model_params) | numeric_globals)})"
                )
            if p in set_elsewhere:
                raise ConfigError(f"space.parameters.{p}: also listed under `fixed` or `options`; choose one")
            spec = (config.parameters or {}).get(p) or ParamSpec()
            default = DEFAULT_PARAMS.get(p)
            bounds = spec.bounds or (default[0] if default else None)
            if bounds is None:
                raise ConfigError(f"space.parameters.{p}: give `bounds: [low, high]` for this parameter")
            lo, hi = float(bounds[0]), float(bounds[1])
            if p in op.ranges:  # never search outside what the operator accepts
                lo, hi = max(lo, op.ranges[p][0]), min(hi, op.ranges[p][1])
            if not lo < hi:
                raise ConfigError(f"space.parameters.{p}: empty range [{lo}, {hi}] (operator allows {op.ranges.get(p)})")
            init = spec.init if spec.init is not None else (default[1] if default else (lo + hi) / 2)
            out[p] = ((lo, hi), float(min(max(init, lo), hi)))
        missing = [p for p, d in op.model_params.items() if d is None and p not in out and p not in config.fixed]
        missing += [p for p, d in op.global_params.items() if d is None and p not in out and p not in config.options]
        if missing:
            raise ConfigError(f"space: operator {op.name!r} needs {missing}; search them or set them under `fixed`")
        return out

    def _groups_for(self, f: str | None) -> list[Group]:
        """Filtered genes exist only for blocks (embeddings and head never match a filter)."""
        if f is REST or self.config.granularity == "global":
            return self.groups
        return [g for g in self.groups if g.kind == "blocks"]

    # ------------------------------------------------------------------ genome -> recipe
    def _value(self, g: np.ndarray, p: str, e: str, f: str | None):
        groups = self._groups_for(f)
        vals = {grp.label: self.round(g[self._index[(p, e, f, grp.label)]]) for grp in groups}
        if self.config.granularity == "global":
            return vals["all"]
        layers = [0.0] * self.num_blocks
        for grp in groups:
            if grp.kind == "blocks":
                layers[grp.lo:grp.hi] = [vals[grp.label]] * (grp.hi - grp.lo)
        embed = vals.get("embed", layers[0])
        head = vals.get("head", layers[-1])
        return GroupValues(embed=embed, layers=layers, head=head)

    def param_values(self, genome: np.ndarray) -> dict[str, dict[str, Any]]:
        """Expert alias → its parameter values (fixed ones included); ``"*"`` → the searched
        global parameters (one set shared by all experts)."""
        g = self.check_genome(genome)
        out = {}
        for e in [*self.experts, SHARED]:
            params: dict[str, Any] = dict(self.config.fixed) if e != SHARED else {}
            for p in self.params:
                if e not in self._owners(p):
                    continue
                if self.config.filters:
                    params[p] = [FilteredValue(filter=f, value=self._value(g, p, e, f)) for f in self.filters]
                else:
                    params[p] = self._value(g, p, e, REST)
            out[e] = params
        return out

    def to_recipe(self, genome) -> Recipe:
        values = self.param_values(genome)
        models = [m.model_copy(update={"parameters": values[m.alias]})
                  for m in self.pool.input_models(self.experts)]
        return Recipe(
            merge_method=self.operator.name,
            base_model=self.pool.base,
            models=models,
            parameters={**self.config.options, **values[SHARED]},
        )

    # ------------------------------------------------------------------ recipe -> genome
    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        if recipe.merge_method != self.operator.name:
            raise ConfigError(
                f"recipe merges with {recipe.merge_method!r} but this space searches {self.operator.name!r}"
            )
        by_alias: dict[str, InputModel] = {m.alias: m for m in recipe.models}
        missing = [e for e in self.experts if e not in by_alias]
        if missing:
            raise ConfigError(f"recipe lacks the experts {missing} of this space")
        g = self.x0.copy()
        for (p, e, f, label), i in self._index.items():
            value = recipe.parameters.get(p) if e == SHARED else by_alias[e].parameters.get(p)
            if value is None:
                continue  # absent: keep the space's start value
            grp = next(x for x in self._groups_for(f) if x.label == label)
            suffix = f"{f}.weight" if f is not REST else self.REST_SUFFIX
            sites = grp.sites(self.num_blocks, suffix)
            if f is not REST:  # a filter only ever applies inside blocks
                sites = [s for s in sites if s.block is not None]
            got = [resolve(value, s) for s in sites]
            got = [float(v) for v in got if v is not None and not isinstance(v, (str, bool))]
            if got:
                g[i] = got[0] if all(v == got[0] for v in got) else float(np.mean(got))
        return np.clip(g, self.lower, self.upper)

    # ------------------------------------------------------------------ warm-start helpers
    #: how many combinations of the other searched parameters' values parent_genomes tries
    MAX_PARENT_TRIES = 27

    def tied_genes(self) -> np.ndarray:
        """One tie group per (parameter, expert, filter): its genes differ only by layer group."""
        groups: dict[tuple, int] = {}
        tie = np.empty(self.dim, dtype=np.int64)
        for (p, e, f, _label), i in self._index.items():
            tie[i] = groups.setdefault((p, e, f), len(groups))
        return tie

    def parent_genomes(self) -> dict[str, np.ndarray]:
        """Genomes that reproduce each expert: its ``weight`` 1, the others' 0, and the other searched
        parameters at their start, upper or lower bound (the first combination that reproduces the
        expert, e.g. density 1 for TIES/DARE). Each candidate is CHECKED with the operator on random
        tensors at every gene group's sites (:func:`evomerge.merge.probe.reproduces`); an expert
        the space cannot express — no searched ``weight``, bounds without 0 or 1, a fixed density
        below 1, an operator that never returns one input (slerp, model_stock) — is left out."""
        import itertools

        from evomerge.merge.probe import reproduces

        if "weight" not in self.params or "weight" not in self.operator.model_params:
            return {}
        (wlo, whi), _ = self.params["weight"]
        if not (wlo <= 0.0 <= whi and wlo <= 1.0 <= whi):
            return {}
        others = [p for p in self.params if p != "weight"]
        choices = [list(dict.fromkeys([init, hi, lo])) for (lo, hi), init in (self.params[p] for p in others)]
        sites = self._probe_sites()
        out = {}
        for expert in self.experts:
            for combo in itertools.islice(itertools.product(*choices), self.MAX_PARENT_TRIES):
                values = dict(zip(others, combo))
                g = self.x0.copy()
                for (p, e, _f, _label), i in self._index.items():
                    g[i] = (1.0 if e == expert else 0.0) if p == "weight" else values[p]
                if reproduces(self.to_recipe(g), expert, sites):
                    out[expert] = g
                    break
        return out

    def _probe_sites(self) -> list:
        """One representative tensor site per gene group and filter (what a parameter resolves at)."""
        sites = {}
        for f in self.filters:
            suffix = f"{f}.weight" if f is not REST else self.REST_SUFFIX
            for grp in self._groups_for(f):
                for s in grp.sites(self.num_blocks, suffix):
                    if f is REST or s.block is not None:
                        sites.setdefault(s.name, s)
        return list(sites.values())

    def describe(self) -> str:
        c = self.config
        gran = c.granularity if c.granularity != "block" else f"blocks of {c.block_size}"
        gran += ", embed/head follow the end blocks" if c.embed_head == "blocks" else ""
        filt = f", filters {c.filters}" if c.filters else ""
        return (f"ps space: {self.operator.name}, {list(self.params)} × {len(self.experts)} experts × "
                f"{len(self.groups)} groups ({gran}{filt}) = {self.dim} genes")
