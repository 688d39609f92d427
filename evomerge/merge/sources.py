"""A merge's inputs and the shape of its output, shared by the engine's modules.

:class:`Sources` holds a recipe's input models by alias (lazily read, or resident on a device);
:class:`OutputTensor` says where one tensor of the merged model comes from. Both
:mod:`evomerge.merge.materialize` and :mod:`evomerge.merge.layer_flow` build on them, so they live
here, below both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge.lora import open_model
from evomerge.merge.vocab import align as align_vocabularies
from evomerge.models import ModelDir, check_compatible
from evomerge.recipe import Recipe


class Sources:
    """A recipe's input models by alias (``base`` and each model's alias).

    Lazily read from disk by default; :meth:`resident` preloads every tensor onto a device so
    that a worker merges from memory.
    """

    def __init__(self, dirs: dict[str, ModelDir], device: str | torch.device = "cpu",
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None):
        if not dirs:
            raise ConfigError("a recipe needs at least one input model")
        self.dirs = dirs
        self.device = torch.device(device)
        self._tensors = tensors

    @classmethod
    def from_recipe(cls, recipe: Recipe, allow_pickle: bool = False) -> "Sources":
        by_path: dict[str, ModelDir] = {}
        dirs = {}
        for alias, path in recipe.model_paths().items():
            if path not in by_path:
                by_path[path] = open_model(path, allow_pickle=allow_pickle)  # dir, adapter, base+adapter
            dirs[alias] = by_path[path]
        src = cls(align_vocabularies(recipe, dirs))
        src.check(same_depth=recipe.layer_flow is None or recipe.merge_method != "passthrough")
        return src

    def check(self, same_depth: bool = True) -> None:
        ref, *others = list(dict.fromkeys(self.dirs.values()))
        check_compatible(ref, others, same_depth=same_depth)

    @property
    def reference(self) -> ModelDir:
        """The model whose layout the output follows: the base, else the first input."""
        return self.dirs.get("base") or next(iter(self.dirs.values()))

    def resident(self, device: str | torch.device) -> "Sources":
        """Every tensor of every input, loaded once onto ``device`` (shared between aliases)."""
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        tensors = {}
        for alias, d in self.dirs.items():
            if id(d) not in loaded:
                loaded[id(d)] = {n: _finite(d.get(n, device), d, n) for n in d.tensor_names}
            tensors[alias] = loaded[id(d)]
        return Sources(self.dirs, device, tensors)

    def get(self, alias: str, name: str) -> torch.Tensor:
        if self._tensors is not None:
            try:
                return self._tensors[alias][name]
            except KeyError:
                raise ModelError(f"{self.dirs[alias].path}: no tensor named {name}") from None
        d = self.dirs[alias]
        return _finite(d.get(name, self.device), d, name)


def _finite(t: torch.Tensor, d: ModelDir, name: str) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ModelError(f"{d.path}: tensor {name} contains NaN or Inf values")
    return t


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model and where it comes from."""

    name: str  # in the merged model
    source: str  # alias, or "merge" for the recipe's parameter-space merge
    source_name: str  # in the source model
    scale: float = 1.0  # folded layer-flow scale (output projections) times the slot's tensor_scale
