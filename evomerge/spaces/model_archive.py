"""Model-archive space: M2N2 crossing *weights* directly (the paper's setting), not recipes.

Archive members are whole models. The first members are the parents themselves (each expert,
and the base with ``include_base``), written as the exact reproduction recipes of
:func:`~evomerge.spaces.base.parent_recipes`, so they share the reference trials' evaluations.
Every later member is a *child*: a split-point SLERP of two members' full parameter vectors
(one ω over the whole vector, split point over the total element count, optional Gaussian
mutation). A child has no merge recipe; its identity is its *lineage* (parents' hashes, split,
w, mutation σ and seed), see :mod:`evomerge.lineage`.

The genome of every candidate records that lineage as five numbers so the run store keeps it
in the ``genome`` column: ``parent_a``, ``parent_b`` (M2N2 member ids, i.e. ask ids; an initial
member k has −(k+1) in both), ``split``, ``w``, ``mutation_seed``. Only the initial members'
genomes map to recipes; the search loop (:class:`evomerge.search.archive.ArchiveSearch`) turns
children into lineages.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.spaces.base import ModelPool, Space, SpaceConfig, parent_recipes, register_space

GENES = ("parent_a", "parent_b", "split", "w", "mutation_seed")
_HUGE = float(2 ** 53)  # every integer below is exact in float64 (splits, seeds, ids)


class ModelArchiveConfig(SpaceConfig):
    type: Literal["model_archive"] = "model_archive"
    include_base: bool = True  # the base joins the initial archive next to the experts
    cache: int | None = Field(default=None, ge=3)  # members kept in worker memory; default archive_size + 2


@register_space("model_archive", ModelArchiveConfig)
class ModelArchiveSpace(Space):
    """The initial members (as recipes) and the lineage genome layout; see the module docstring."""

    def __init__(self, config: ModelArchiveConfig, pool: ModelPool):
        super().__init__(config, pool)
        self.recipes: dict[str, Recipe] = parent_recipes(pool)
        self.members = [a for a in pool.aliases if a != "base" or config.include_base]
        if len(self.members) < 2:
            raise ConfigError("space model_archive: the initial archive needs at least two models; list two "
                              "experts, or one expert and a base with include_base: true")
        n = len(self.members)
        self._finish([-float(n)] * 2 + [0.0, 0.0, 0.0], [_HUGE, _HUGE, _HUGE, 1.0, _HUGE],
                     self.source_genome(0).tolist(), list(GENES))

    def source_genome(self, k: int) -> np.ndarray:
        """Genome of initial member k (``self.members[k]``)."""
        return np.array([-(k + 1), -(k + 1), 0.0, 0.0, 0.0], dtype=np.float64)

    def source_index(self, genome) -> int | None:
        g = np.asarray(genome, dtype=np.float64).reshape(-1)
        if g.size != len(GENES) or g[0] >= 0 or g[0] != g[1]:
            return None
        k = -int(g[0]) - 1
        return k if 0 <= k < len(self.members) else None

    def to_recipe(self, genome) -> Recipe:
        k = self.source_index(genome)
        if k is None:
            raise ConfigError("model_archive space: only initial members have a recipe; a child's weights are "
                              "crossed from its parents (its lineage, evomerge.lineage.Lineage)")
        return self.recipes[self.members[k]]

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        h = recipe.hash()
        for k, alias in enumerate(self.members):
            if self.recipes[alias].hash() == h:
                return self.source_genome(k)
        raise ConfigError("model_archive space: the recipe is not one of the initial members' "
                          "(a parent reproduced exactly)")

    def describe(self) -> str:
        return (f"model_archive space: M2N2 on weights, {len(self.members)} initial members "
                f"({', '.join(self.members)})")
