"""Hybrid search: parameter space first, then data-flow space over a pool that holds the PS merge.

After Akiba et al. 2024 (docs/ALGORITHMS.md §3, "Hybrid PS+DFS"). The genome is the PS genome
followed by the DFS genome, searched in two stages: stage ``ps`` moves the PS genes (the layer
flow stays at its start, the merge's own blocks: the pure PS merge); stage ``dfs`` keeps the best
PS genes and moves the DFS genes. The DFS pool contains ``merge`` — the recipe's own PS merge —
so a hybrid recipe is PS parameters plus a ``layer_flow``. A flow that is exactly the merge's
own blocks at scale 1 is left out of the recipe, so that the pure PS merge has one identity.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.recipe import MERGED, Recipe
from evomerge.spaces.base import ModelPool, Space, SpaceConfig, Stage, register_space
from evomerge.spaces.dfs import DFSConfig, DFSSpace
from evomerge.spaces.ps import PSConfig, PSSpace


class HybridConfig(SpaceConfig):
    type: Literal["hybrid"] = "hybrid"
    ps: PSConfig = Field(default_factory=PSConfig)
    dfs: DFSConfig = Field(default_factory=DFSConfig)
    ps_fraction: float = Field(default=0.5, gt=0, lt=1)  # share of the evaluation budget for stage 1

    def merge_methods(self) -> tuple[str, ...]:
        return self.ps.merge_methods()  # the DFS stage's layer flow stacks that merge's blocks


@register_space("hybrid", HybridConfig)
class HybridSpace(Space):
    def __init__(self, config: HybridConfig, pool: ModelPool):
        super().__init__(config, pool)
        ps_cfg = config.ps.model_copy(update={"decimals": config.decimals})
        dfs_pool = config.dfs.pool if config.dfs.pool is not None else [MERGED, *pool.expert_aliases]
        dfs_cfg = config.dfs.model_copy(update={
            "decimals": config.decimals, "pool": dfs_pool,
            "model_a": config.dfs.model_a or (MERGED if MERGED in dfs_pool else None),
        })
        self.ps = PSSpace(ps_cfg, pool)
        self.dfs = DFSSpace(dfs_cfg, pool, extra_blocks={MERGED: pool.reference_blocks})
        self.n_ps = self.ps.dim
        self._finish(
            [*self.ps.lower, *self.dfs.lower], [*self.ps.upper, *self.dfs.upper],
            [*self.ps.x0, *self.dfs.x0], [*self.ps.names, *self.dfs.names],
        )

    @property
    def stages(self) -> list[Stage]:
        f = self.config.ps_fraction
        return [Stage("ps", np.arange(self.n_ps), f), Stage("dfs", np.arange(self.n_ps, self.dim), 1.0 - f)]

    def _is_identity(self, flow) -> bool:
        return self.dfs.model_a == MERGED and [(s.model, s.layer, s.scale) for s in flow.slots] == [
            (MERGED, i, 1.0) for i in range(self.pool.reference_blocks)
        ]

    def to_recipe(self, genome) -> Recipe:
        g = self.check_genome(genome)
        recipe = self.ps.to_recipe(g[: self.n_ps])
        flow = self.dfs.layer_flow(g[self.n_ps:])
        if self._is_identity(flow):
            return recipe
        return Recipe.model_validate({**recipe.model_dump(), "layer_flow": flow.model_dump()})

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        ps = self.ps.from_recipe(recipe)
        if recipe.layer_flow is not None:
            dfs = self.dfs.genome_from_flow(recipe.layer_flow)
        elif self.dfs.model_a == MERGED:
            dfs = self.dfs.x0.copy()
        else:
            raise ConfigError(f"recipe has no layer_flow; this hybrid space's model A is {self.dfs.model_a!r}")
        return np.concatenate([ps, dfs])

    def parent_genomes(self) -> dict[str, np.ndarray]:
        """The PS stage's parent genomes with the layer flow at its start, when that start is the
        merge's own blocks (the pure PS merge); else none."""
        if not self._is_identity(self.dfs.layer_flow(self.dfs.x0)):
            return {}
        return {k: np.concatenate([g, self.dfs.x0]) for k, g in self.ps.parent_genomes().items()}

    def tied_genes(self) -> np.ndarray:
        ps = self.ps.tied_genes()
        return np.concatenate([ps, self.dfs.tied_genes() + (int(ps.max()) + 1 if ps.size else 0)])

    def describe(self) -> str:
        return f"hybrid space: [{self.ps.describe()}] then [{self.dfs.describe()}] = {self.dim} genes"
