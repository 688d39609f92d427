"""A merge's inputs and the shape of its output, shared by the engine's modules.

:class:`Sources` holds a recipe's input models by alias (lazily read, or placed for a search
worker: :mod:`evomerge.merge.placement`);
:class:`OutputTensor` says where one tensor of the merged model comes from. Both
:mod:`evomerge.merge.materialize` and :mod:`evomerge.merge.layer_flow` build on them, so they live
here, below both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.errors import ConfigError
from evomerge.merge.lora import open_model
from evomerge.merge.placement import check_finite, place
from evomerge.merge.vocab import align as align_vocabularies
from evomerge.models import ModelDir, check_compatible
from evomerge.recipe import Recipe, reference_alias


class Sources:
    """A recipe's input models by alias (``base`` and each model's alias).

    Lazily read from disk by default; :meth:`place` puts every input where a worker merges
    from (:mod:`evomerge.merge.placement`: resident on the device, pinned host memory, or
    memory-mapped files), :meth:`resident` being the first.
    """

    def __init__(self, dirs: dict[str, ModelDir], device: str | torch.device = "cpu", placed=None):
        if not dirs:
            raise ConfigError("a recipe needs at least one input model")
        self.dirs = dirs
        self.device = torch.device(device)
        self.placed = placed  # a placement.Placed, or None: read lazily

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
        return self.dirs[reference_alias(self.dirs)]

    def place(self, kind: str, device: str | torch.device,
              devices: dict[str, torch.device] | None = None) -> "Sources":
        """These inputs placed as ``kind`` (resident, pinned, mmap) for merges on ``device``;
        ``devices`` maps checkpoint tensor names to the device of the parameter they feed
        (split models: :func:`evomerge.merge.devices.tensor_devices`)."""
        device = torch.device(device)
        devices = devices or {}
        return Sources(self.dirs, device, place(kind, self.dirs, lambda n: devices.get(n, device)))

    def resident(self, device: str | torch.device) -> "Sources":
        """Every tensor of every input, loaded once onto ``device`` (shared between aliases)."""
        return self.place("resident", device)

    def get(self, alias: str, name: str, device: torch.device | None = None) -> torch.Tensor:
        """Tensor ``name`` of input ``alias`` on ``device`` (default: the sources'); never to be
        modified (it may be the placed copy)."""
        device = self.device if device is None else torch.device(device)
        if self.placed is not None:
            return self.placed.get(alias, name, device)
        d = self.dirs[alias]
        return check_finite(d.get(name, device), d, name)

    def expect(self, keys: list[tuple[str, str, torch.device]]) -> None:
        """Announce the next merge's requests, in order (streamed placements stage ahead)."""
        if self.placed is not None:
            self.placed.expect(keys)

    def close(self) -> None:
        """Release what the placement holds (pinned memory is unregistered; idempotent)."""
        if self.placed is not None:
            self.placed.close()


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model and where it comes from."""

    name: str  # in the merged model
    source: str  # alias, or "merge" for the recipe's parameter-space merge
    source_name: str  # in the source model
    scale: float = 1.0  # folded layer-flow scale (output projections) times the slot's tensor_scale
