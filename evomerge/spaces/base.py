"""Search spaces: a bounded real vector (the genome) ⇄ a merge :class:`~evomerge.recipe.Recipe`.

Optimizers only see boxes of real numbers; everything that makes a genome a *merge* lives here.
Every space offers ``lower``/``upper``/``x0`` (numpy float64 arrays of equal length), ``names``
(one readable label per gene), ``to_recipe(genome)`` and ``from_recipe(recipe)`` (the projection
of any recipe onto the space, so that ``from_recipe(to_recipe(g))`` gives back ``g`` up to the
recipe's rounding and ``to_recipe(from_recipe(r)) == r`` for every recipe the space produces).

A space may be searched in *stages* (the hybrid PS→DFS search): each :class:`Stage` names the
genes it optimises and its share of the budget; the other genes stay at the best genome found
so far.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from evomerge.errors import ConfigError
from evomerge.io import load_yaml, parse_model
from evomerge.paths import search_spaces_dir
from evomerge.recipe import InputModel, Recipe

SEARCH_SPACES_DIR = search_spaces_dir()


# ---------------------------------------------------------------------- the models a space combines
@dataclass(frozen=True)
class ModelPool:
    """The base model and the experts of a search, with each model's number of blocks.

    Aliases are how recipes refer to models (``base`` for the base model, an expert's ``name`` or
    directory name otherwise).
    """

    base: str | None
    experts: tuple[InputModel, ...]
    num_blocks: dict[str, int] = field(default_factory=dict)  # alias -> blocks ("base" included)

    def __post_init__(self):
        if not self.experts:
            raise ConfigError("models: a search needs at least one expert")
        aliases = [e.alias for e in self.experts]
        dupes = sorted({a for a in aliases if aliases.count(a) > 1})
        if dupes:
            raise ConfigError(f"models: expert names must be unique, repeated: {dupes}; set `name:`")
        if "base" in aliases or "merge" in aliases:
            raise ConfigError("models: 'base' and 'merge' are reserved names; rename that expert")
        missing = [a for a in self.aliases if a not in self.num_blocks]
        if missing:
            raise ConfigError(f"models: number of blocks unknown for {missing}")

    @classmethod
    def from_paths(cls, base: str | None, experts: list[InputModel], check: bool = True) -> "ModelPool":
        """Open every model directory (lazily), check they can be merged, count their blocks."""
        from evomerge.merge.lora import open_model
        from evomerge.models import check_compatible

        dirs = {e.alias: open_model(e.model) for e in experts}
        if base is not None:
            dirs = {"base": open_model(base), **dirs}
        if check:  # same architecture and block layout; equal depth is the PS space's requirement
            first, *rest = dirs.values()
            check_compatible(first, rest, same_depth=False)
        return cls(base=base, experts=tuple(experts), num_blocks={a: d.num_blocks for a, d in dirs.items()})

    @property
    def aliases(self) -> list[str]:
        """``base`` (when there is one) then the experts, in order."""
        return (["base"] if self.base is not None else []) + [e.alias for e in self.experts]

    @property
    def paths(self) -> dict[str, str]:
        """Alias → model directory, ``base`` first."""
        return {**({"base": self.base} if self.base is not None else {}), **{e.alias: e.model for e in self.experts}}

    @property
    def expert_aliases(self) -> list[str]:
        return [e.alias for e in self.experts]

    @property
    def reference_blocks(self) -> int:
        """Blocks of the model every PS merge has (the base's, else the first expert's)."""
        return self.num_blocks["base" if self.base is not None else self.experts[0].alias]

    def input_models(self, aliases: list[str] | None = None) -> list[InputModel]:
        """Experts as plain recipe inputs (parameters dropped), optionally only some of them."""
        keep = set(aliases) if aliases is not None else None
        return [InputModel(model=e.model, name=e.name) for e in self.experts
                if keep is None or e.alias in keep]


def parent_recipes(pool: ModelPool) -> dict[str, Recipe]:
    """Recipes that reproduce each parent exactly, to score parents with the search's workers.

    The base is ``task_arithmetic`` with all weights 0 (θ0 + 0); expert k is ``linear`` with a
    one-hot weight vector (0·θj + 1·θk, exact in floating point).
    """
    models = pool.input_models()
    out: dict[str, Recipe] = {}
    if pool.base is not None:
        out["base"] = Recipe(
            merge_method="task_arithmetic", base_model=pool.base,
            models=[m.model_copy(update={"parameters": {"weight": 0.0}}) for m in models],
        )
    for e in pool.experts:
        out[e.alias] = Recipe(
            merge_method="linear", base_model=pool.base,
            models=[m.model_copy(update={"parameters": {"weight": 1.0 if m.alias == e.alias else 0.0}})
                    for m in models],
            parameters={"normalize": False},
        )
    return out


# ---------------------------------------------------------------------- spaces
@dataclass(frozen=True)
class Stage:
    """One stage of a staged search: the genes it optimises and its share of the budget."""

    name: str
    genes: np.ndarray  # int indices into the full genome
    fraction: float = 1.0


class SpaceConfig(BaseModel):
    """Common keys of every space's config (each space subclasses this)."""

    model_config = ConfigDict(extra="forbid")
    type: str
    decimals: int | None = 4  # recipe values are rounded to this many decimals (None: exact)

    def merge_methods(self) -> tuple[str, ...]:
        """The merge operators (``OPERATORS`` names) of this space's parameter-space merges; the
        memory plan sizes what they keep between candidates (the order cache). None by default."""
        return ()


class Space(ABC):
    """A bounded box of genomes and its map to recipes."""

    type: ClassVar[str]

    def __init__(self, config: SpaceConfig, pool: ModelPool):
        self.config = config
        self.pool = pool
        self.lower = np.zeros(0)
        self.upper = np.zeros(0)
        self.x0 = np.zeros(0)
        self.names: list[str] = []

    # -- to implement
    @abstractmethod
    def to_recipe(self, genome: np.ndarray) -> Recipe: ...

    @abstractmethod
    def from_recipe(self, recipe: Recipe) -> np.ndarray: ...

    # -- shared
    @property
    def dim(self) -> int:
        return len(self.lower)

    @property
    def stages(self) -> list[Stage]:
        return [Stage("all", np.arange(self.dim), 1.0)]

    def check_genome(self, genome) -> np.ndarray:
        """A float64 copy of ``genome`` clipped into the box; wrong length or NaN is an error."""
        g = np.asarray(genome, dtype=np.float64).reshape(-1)
        if g.shape != self.lower.shape:
            raise ConfigError(f"{self.type} space: genome has {g.size} values, the space has {self.dim}")
        if not np.all(np.isfinite(g)):
            raise ConfigError(f"{self.type} space: genome has non-finite values")
        return np.clip(g, self.lower, self.upper)

    def round(self, value: float) -> float:
        d = self.config.decimals
        return float(value) if d is None else float(round(float(value), d))

    def _finish(self, lower: list[float], upper: list[float], x0: list[float], names: list[str]) -> None:
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        self.x0 = np.clip(np.asarray(x0, dtype=np.float64), self.lower, self.upper)
        self.names = list(names)
        bad = np.nonzero(~(self.lower < self.upper))[0]
        if bad.size:
            i = int(bad[0])
            raise ConfigError(
                f"{self.type} space: empty bounds for {self.names[i]}: [{self.lower[i]}, {self.upper[i]}]"
            )

    def describe(self) -> str:
        return f"{self.type} space, {self.dim} genes"

    def parent_genomes(self) -> dict[str, np.ndarray]:
        """Expert alias → a genome whose recipe reproduces that expert (up to float32 rounding).

        None by default: a space that cannot express its parents (``dfs``: its ``x0`` already is
        model A; ``model_archive``: its initial members are the parents). Used by the ``parents``
        warm start (:mod:`evomerge.spaces.warm`)."""
        return {}

    def tied_genes(self) -> np.ndarray:
        """Per gene, the index of its tie group: genes of one group play the same role in different
        places (a PS space's layer groups of one parameter, expert and filter). A coarse design
        (the ``grid`` warm start) moves each group as one. Default: every gene its own group."""
        return np.arange(self.dim)


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SpaceEntry:
    config: type[SpaceConfig]
    build: Callable[[Any, ModelPool], Space]


SPACES: dict[str, SpaceEntry] = {}


def register_space(name: str, config: type[SpaceConfig]):
    """Class decorator: make a space available as ``type: <name>`` in configs."""

    def deco(cls):
        cls.type = name
        SPACES[name] = SpaceEntry(config=config, build=cls)
        return cls

    return deco


def space_defaults(kind: str) -> dict:
    """The defaults of a space type, from its pydantic model: the one home of space defaults.

    ``search_spaces/<type>.yaml`` shows the same values with a banner explaining every key; it is
    documentation (and a starting point to copy), not read for defaults, and a test fails when
    the two drift apart.
    """
    return SPACES[kind].config.model_validate({"type": kind}).model_dump()


def parse_space_config(value: Any, where: str = "space") -> SpaceConfig:
    """A space config from a space name (``ps``), a YAML path, or a mapping with ``type``.

    A name is the type's defaults; a mapping only names what it changes (merged, nested mappings
    included, into the defaults of :func:`space_defaults`).
    """
    if isinstance(value, SpaceConfig):
        return value
    if isinstance(value, (str, Path)):
        text = str(value)
        if text in SPACES:
            data: Any = {"type": text}
        elif text.endswith((".yaml", ".yml")):
            data = load_yaml(text)
            where = text
        else:
            raise ConfigError(
                f"{where}: unknown search space {text!r}; use one of {', '.join(sorted(SPACES))} "
                "or a path to a .yaml file"
            )
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with `type`")
        return parse_space_config(data, where)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a space name or a mapping, got {type(value).__name__}")
    kind = value.get("type")
    if kind not in SPACES:
        raise ConfigError(
            f"{where}.type: {kind!r} is not a search space; use one of {', '.join(sorted(SPACES))}"
        )
    return parse_model(SPACES[kind].config, _deep_merge(space_defaults(kind), value), where)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_space(config: Any, pool: ModelPool) -> Space:
    """Build the space named by ``config`` (see :func:`parse_space_config`) over ``pool``."""
    cfg = parse_space_config(config)
    return SPACES[cfg.type].build(cfg, pool)


def log2_bounds(bounds: tuple[float, float], what: str) -> tuple[float, float]:
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ConfigError(f"{what}: bounds must satisfy 0 < low < high, got [{lo}, {hi}]")
    return math.log2(lo), math.log2(hi)
