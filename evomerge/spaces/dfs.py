"""Data-flow-space (DFS) search: which blocks the merged network runs, in which order, at what scale.

After Akiba et al. 2024 (docs/ALGORITHMS.md §3). The *pool* is every block of the pooled models
(model A first); the *slots* are the pool repeated ``repeats`` times. Gene ``I_t`` switches slot
``t`` on when it is positive; the path is the switched-on slots in order. Constraints, enforced
by construction rather than penalties:

* embeddings, tokenizer and head come from model A (``layer_flow.embed_from``);
* the path starts with A's first block (slot 0, always on, no gene) and ends with A's last block
  (the last repetition's copy of it, always on, moved to the very end, no gene);
* ``x0`` switches on A's own blocks in the first repetition, so the start point is model A.

Scaling: the stream entering a block is multiplied by a positive scale, searched as ``log2``
scale (positivity by construction). ``compact`` (default) has one scale per transition *type* —
``next`` (same model, next block), ``skip`` (same model, jumps forward), ``repeat`` (same model,
same or earlier block), ``cross`` (another model); ``matrix`` has one per ordered pair of pool
blocks (M² genes); ``none`` keeps every scale at 1. The first block (entered from the
embeddings) always has scale 1.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from evomerge.errors import ConfigError
from evomerge.recipe import MERGED, LayerFlow, LayerSlot, Recipe
from evomerge.spaces.base import ModelPool, Space, SpaceConfig, log2_bounds, register_space

TRANSITIONS = ("next", "skip", "repeat", "cross")


class DFSConfig(SpaceConfig):
    type: Literal["dfs"] = "dfs"
    pool: list[str] | None = None  # model aliases ("base" allowed); default: every expert
    model_a: str | None = None  # embeddings, head, first and last block; default: first of pool
    repeats: int = Field(default=2, ge=1)
    scaling: Literal["compact", "matrix", "none"] = "compact"
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    indicator_bounds: tuple[float, float] = (-1.0, 1.0)
    init_on: float = 0.5
    init_off: float = -0.5

    @model_validator(mode="after")
    def _check(self) -> "DFSConfig":
        lo, hi = self.indicator_bounds
        if not (lo <= self.init_off <= 0 < self.init_on <= hi):
            raise ValueError(
                f"need indicator_bounds[0] <= init_off <= 0 < init_on <= indicator_bounds[1], got "
                f"{lo} <= {self.init_off} <= 0 < {self.init_on} <= {hi}"
            )
        return self


def transition(prev: tuple[str, int], cur: tuple[str, int]) -> str:
    (m0, l0), (m1, l1) = prev, cur
    if m0 != m1:
        return "cross"
    if l1 == l0 + 1:
        return "next"
    return "skip" if l1 > l0 else "repeat"


@register_space("dfs", DFSConfig)
class DFSSpace(Space):
    def __init__(self, config: DFSConfig, pool: ModelPool, *, extra_blocks: dict[str, int] | None = None):
        """``extra_blocks``: pseudo-models allowed in the pool besides the real ones (``merge``)."""
        super().__init__(config, pool)
        blocks = {**pool.num_blocks, **(extra_blocks or {})}
        names = list(config.pool) if config.pool is not None else pool.expert_aliases
        unknown = [a for a in names if a not in blocks]
        if unknown:
            raise ConfigError(f"space.pool: {unknown} are not models of this search (known: {sorted(blocks)})")
        if len(set(names)) != len(names):
            raise ConfigError(f"space.pool: repeated model in {names}")
        a = config.model_a or names[0]
        if a not in names:
            raise ConfigError(f"space.model_a: {a!r} is not in the pool {names}")
        self.model_a = a
        self.order = [a] + [n for n in names if n != a]  # A first: slot 0 is A's first block
        self.blocks = {n: blocks[n] for n in self.order}
        la = self.blocks[a]
        r = config.repeats

        # Pool layers (model, layer) and the slots (pool repeated r times) that carry genes.
        self.pool_layers = [(m, i) for m in self.order for i in range(self.blocks[m])]
        self.pool_index = {pl: i for i, pl in enumerate(self.pool_layers)}
        self.first = (a, 0)
        self.last = (a, la - 1)
        self.slots: list[tuple[int, str, int]] = []
        for rep in range(r):
            for m, i in self.pool_layers:
                if (rep, (m, i)) in ((0, self.first), (r - 1, self.last)):
                    continue  # forced: the path's first and final block
                self.slots.append((rep, m, i))

        ilo, ihi = config.indicator_bounds
        lower, upper, x0, gnames = [], [], [], []
        for rep, m, i in self.slots:
            on = rep == 0 and m == a and 0 < i < la - 1
            lower.append(ilo), upper.append(ihi), x0.append(config.init_on if on else config.init_off)
            gnames.append(f"I[r{rep}:{m}.{i}]")
        self.n_indicators = len(self.slots)

        slo, shi = log2_bounds(config.scale_bounds, "space.scale_bounds")
        if config.scaling == "compact":
            kinds = [t for t in TRANSITIONS if t != "cross" or len(self.order) > 1]
            self.scale_keys = list(kinds)
            gnames += [f"log2_scale[{t}]" for t in kinds]
        elif config.scaling == "matrix":
            self.scale_keys = [(p, q) for p in self.pool_layers for q in self.pool_layers]
            gnames += [f"log2_W[{p[0]}.{p[1]}->{q[0]}.{q[1]}]" for p, q in self.scale_keys]
        else:
            self.scale_keys = []
        self.scale_index = {k: self.n_indicators + j for j, k in enumerate(self.scale_keys)}
        n_scales = len(self.scale_keys)
        self._finish(lower + [slo] * n_scales, upper + [shi] * n_scales, x0 + [0.0] * n_scales, gnames)

    # ------------------------------------------------------------------ genome <-> layer flow
    def _scale_key(self, prev: tuple[str, int], cur: tuple[str, int]):
        if self.config.scaling == "compact":
            return transition(prev, cur)
        if self.config.scaling == "matrix":
            return (prev, cur)
        return None

    def _scale(self, g: np.ndarray, key) -> float:
        if key is None:
            return 1.0
        s = self.round(2.0 ** g[self.scale_index[key]])
        floor = 10.0 ** -(self.config.decimals or 12)
        return max(s, floor)  # rounding must never make a scale zero

    def path(self, genome) -> list[tuple[str, int]]:
        g = self.check_genome(genome)
        on = [(m, i) for (rep, m, i), v in zip(self.slots, g[: self.n_indicators]) if v > 0]
        return [self.first, *on, self.last]

    def layer_flow(self, genome) -> LayerFlow:
        g = self.check_genome(genome)
        path = self.path(g)
        slots = [LayerSlot(model=path[0][0], layer=path[0][1], scale=1.0)]
        for prev, cur in zip(path, path[1:]):
            slots.append(LayerSlot(model=cur[0], layer=cur[1], scale=self._scale(g, self._scale_key(prev, cur))))
        return LayerFlow(embed_from=self.model_a, slots=slots)

    def genome_from_flow(self, flow: LayerFlow) -> np.ndarray:
        """The canonical genome of a layer flow: on/off at ``init_on``/``init_off``, observed scales."""
        embed = flow.embed_from or self.model_a
        if embed != self.model_a:
            raise ConfigError(f"layer flow takes embeddings from {embed!r}; this space's model A is {self.model_a!r}")
        path = [(s.model, s.layer) for s in flow.slots]
        for m, i in path:
            if (m, i) not in self.pool_index:
                raise ConfigError(f"layer flow uses block {i} of {m!r}, which is not in this space's pool")
        if len(path) < 2 or path[0] != self.first or path[-1] != self.last:
            raise ConfigError(
                f"layer flow must start with {self.model_a}.0 and end with {self.model_a}.{self.last[1]} "
                f"(path {path[0]}..{path[-1]})"
            )
        g = self.x0.copy()
        g[: self.n_indicators] = self.config.init_off
        k = 0  # greedy earliest match of the inner path against the slot order (a subsequence)
        for item in path[1:-1]:
            while k < len(self.slots) and self.slots[k][1:] != item:
                k += 1
            if k == len(self.slots):
                raise ConfigError(
                    f"layer flow cannot be written with {self.config.repeats} repetitions of the pool; "
                    "raise `repeats`"
                )
            g[k] = self.config.init_on
            k += 1
        logs: dict = {}
        for prev, cur, slot in zip(path, path[1:], flow.slots[1:]):
            key = self._scale_key(prev, cur)
            if key is not None:
                logs.setdefault(key, []).append(math.log2(slot.scale))
        for key, vals in logs.items():
            g[self.scale_index[key]] = vals[0] if all(v == vals[0] for v in vals) else float(np.mean(vals))
        return np.clip(g, self.lower, self.upper)

    # ------------------------------------------------------------------ genome <-> recipe
    def to_recipe(self, genome) -> Recipe:
        real = [m for m in self.order if m not in ("base", MERGED)]
        return Recipe(
            merge_method="passthrough",
            base_model=self.pool.base if "base" in self.order else None,
            models=self.pool.input_models(real),
            layer_flow=self.layer_flow(genome),
            tokenizer_source=None if self.model_a == "base" else self.model_a,
        )

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        if recipe.layer_flow is None:
            raise ConfigError("recipe has no layer_flow; a dfs space needs one")
        return self.genome_from_flow(recipe.layer_flow)

    def describe(self) -> str:
        return (f"dfs space: pool {self.order} ({len(self.pool_layers)} blocks) × {self.config.repeats} repeats, "
                f"{self.config.scaling} scaling = {self.dim} genes")
