"""Recipe → weights, one tensor at a time.

:func:`merged_tensors` is the single place where a recipe becomes tensors; both ways of
materialising a merge consume it:

* :func:`apply_in_place` overwrites the parameters of an already-instantiated model (a search
  worker does this thousands of times: no disk, no re-instantiation, no second copy of the model);
* :func:`evomerge.merge.export.export_model` streams the tensors into a Hugging Face directory.

Inputs come from :class:`Sources`: memory-mapped safetensors (export), or placed once for a
search worker (:mod:`evomerge.merge.placement`: resident on its device, pinned host memory, or
files read per candidate). Each tensor is merged on the device of its target parameter, so a
model split over several GPUs is merged where it lives.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from evomerge.errors import ConfigError, ModelError
from evomerge.merge import layer_flow as lf
from evomerge.merge.operators import Operator, get_operator
from evomerge.merge.placement import check_finite, place
from evomerge.models import ModelDir, check_compatible
from evomerge.recipe import MERGED, Recipe, TensorSite, resolve


# ---------------------------------------------------------------------- sources
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
                by_path[path] = ModelDir(path, allow_pickle=allow_pickle)
            dirs[alias] = by_path[path]
        src = cls(dirs)
        src.check(same_depth=recipe.layer_flow is None or recipe.merge_method != "passthrough")
        return src

    def check(self, same_depth: bool = True) -> None:
        ref, *others = list(dict.fromkeys(self.dirs.values()))
        check_compatible(ref, others, same_depth=same_depth)

    @property
    def reference(self) -> ModelDir:
        """The model whose layout the output follows: the base, else the first input."""
        return self.dirs.get("base") or next(iter(self.dirs.values()))

    def place(self, kind: str, device: str | torch.device,
              devices: dict[str, torch.device] | None = None) -> "Sources":
        """These inputs placed as ``kind`` (resident, pinned, mmap) for merges on ``device``;
        ``devices`` maps tensor names to the device of the parameter they feed (split models)."""
        device = torch.device(device)
        devices = devices or {}
        return Sources(self.dirs, device, place(kind, self.dirs, lambda n: devices.get(n, device)))

    def resident(self, device: str | torch.device) -> "Sources":
        """Every tensor of every input, loaded once onto ``device`` (shared between aliases)."""
        return self.place("resident", device)

    def get(self, alias: str, name: str, device: torch.device | None = None) -> torch.Tensor:
        device = self.device if device is None else device
        if self.placed is not None:
            return self.placed.get(alias, name, device)
        d = self.dirs[alias]
        return check_finite(d.get(name, device), d, name)

    def expect(self, keys: list[tuple[str, str, torch.device]]) -> None:
        """Announce the next merge's requests, in order (streamed placements stage ahead)."""
        if self.placed is not None:
            self.placed.expect(keys)

    def close(self) -> None:
        if self.placed is not None:
            self.placed.close()


# ---------------------------------------------------------------------- parameter resolution
@dataclass(frozen=True)
class _Plan:
    op: Operator
    seed_key: str  # identifies the parameter-space merge (not the layer flow) for RNG seeding


def _plan(recipe: Recipe) -> _Plan:
    op = get_operator(recipe.merge_method)
    n = len(recipe.models)
    if n < op.min_models or (op.max_models is not None and n > op.max_models):
        want = f"{op.min_models}" if op.max_models == op.min_models else (
            f"at least {op.min_models}" if op.max_models is None else f"{op.min_models}–{op.max_models}")
        raise ConfigError(f"merge_method {op.name} takes {want} models, the recipe lists {n}")
    if op.needs_base and recipe.base_model is None:
        raise ConfigError(f"merge_method {op.name} needs `base_model`")
    return _Plan(op=op, seed_key=recipe.merge_key())


def _value(recipe: Recipe, model_index: int | None, pname: str, default: Any, site: TensorSite,
           op: Operator) -> Any:
    """A parameter for one model (or a global one) at one tensor, mergekit's lookup order."""
    value = None
    if model_index is not None:
        value = resolve(recipe.models[model_index].parameters.get(pname), site)
    if value is None:
        value = resolve(recipe.parameters.get(pname), site)
    if value is None:
        value = default
    where = f"models[{model_index}].parameters.{pname}" if model_index is not None else f"parameters.{pname}"
    if value is None:
        raise ConfigError(f"{where}: required by merge_method {op.name} (missing for tensor {site.name})")
    rng = op.ranges.get(pname)
    if rng is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} = {value!r} must be a number for {op.name}")
        if not rng[0] <= value <= rng[1]:
            raise ConfigError(f"{where} = {value:g} is outside [{rng[0]:g}, {rng[1]:g}] for {op.name}"
                              f" (tensor {site.name})")
    return value


def _seed(seed_key: str, recipe_seed: int, name: str) -> int:
    h = hashlib.sha256(f"{seed_key}:{recipe_seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _merge_inputs(recipe: Recipe, plan: _Plan, sources: Sources, name: str) -> list[str]:
    """The aliases a merged tensor reads, in order (base first when the operator needs it)."""
    if name not in sources.reference:
        raise ModelError(f"{sources.reference.path}: no tensor named {name}")
    if not sources.reference.dtype(name).is_floating_point:  # copied from one model, not merged
        return ["base" if "base" in sources.dirs else recipe.models[0].alias]
    return (["base"] if plan.op.needs_base else []) + [m.alias for m in recipe.models]


def merge_tensor(recipe: Recipe, plan: _Plan, sources: Sources, name: str, site: TensorSite,
                 out: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """The parameter-space merge of one tensor (float32, on ``device``, default the sources'),
    written into ``out`` when given (a float32 tensor that aliases no input, e.g. a resident
    parameter)."""
    op = plan.op
    aliases = _merge_inputs(recipe, plan, sources, name)
    if not sources.reference.dtype(name).is_floating_point:
        return sources.get(aliases[0], name, device).clone()
    params = [{p: _value(recipe, k, p, d, site, op) for p, d in op.model_params.items()}
              for k in range(len(recipe.models))]
    options = {p: _value(recipe, None, p, d, site, op) for p, d in op.global_params.items()}
    inputs = [sources.get(a, name, device).float() for a in aliases]
    base = inputs.pop(0) if op.needs_base else None
    tensors = inputs
    gen = None
    if op.random:
        gen = torch.Generator(device=tensors[0].device)
        gen.manual_seed(_seed(plan.seed_key, recipe.seed, name))
    return op.fn(base, tensors, params, options, gen, out=out)


# ---------------------------------------------------------------------- the merge as a stream
@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model and where it comes from."""

    name: str  # in the merged model
    source: str  # alias, or "merge" for the recipe's parameter-space merge
    source_name: str  # in the source model
    scale: float = 1.0  # folded layer-flow scale (output projections only)


def output_layout(recipe: Recipe, sources: Sources) -> list[OutputTensor]:
    """The merged model's tensors in file order: embeddings, blocks, head."""
    ref = sources.reference
    if recipe.layer_flow is None:
        src = MERGED if recipe.merge_method != "passthrough" else _first_alias(recipe)
        return [OutputTensor(n, src, n) for n in ref.tensor_names]
    return lf.layout(recipe, sources)


def _first_alias(recipe: Recipe) -> str:
    return recipe.models[0].alias if recipe.models else "base"


def validate(recipe: Recipe, sources: Sources) -> list[OutputTensor]:
    """Check everything that can be checked before the first tensor is written."""
    plan = _plan(recipe)
    layout = output_layout(recipe, sources)
    if any(o.source == MERGED for o in layout):
        ref = sources.reference
        for name in ref.tensor_names:
            site = ref.site(name)
            for k in range(len(recipe.models)):
                for p, d in plan.op.model_params.items():
                    _value(recipe, k, p, d, site, plan.op)
            for p, d in plan.op.global_params.items():
                _value(recipe, None, p, d, site, plan.op)
    return layout


def merged_tensors(recipe: Recipe, sources: Sources, layout: list[OutputTensor] | None = None,
                   targets: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the merged model, one at a time (float32
    for floating tensors). Merged tensors are computed straight into ``targets[name]`` when that
    is a float32 tensor on the right device (then the yielded tensor *is* the target)."""
    layout = validate(recipe, sources) if layout is None else layout
    plan = _plan(recipe)
    ref = sources.reference
    targets = targets or {}
    # each tensor is merged on the device of its target (a split model spans several)
    devices = [targets[o.name].device if o.name in targets else sources.device for o in layout]
    sources.expect([(a, o.source_name, dev) for o, dev in zip(layout, devices)
                    for a in (_merge_inputs(recipe, plan, sources, o.source_name) if o.source == MERGED
                              else [o.source])])
    for out, device in zip(layout, devices):
        if out.source == MERGED:  # a fresh tensor (or the target): scale it in place
            dest = targets.get(out.name)
            if dest is not None and (dest.dtype != torch.float32 or not dest.is_contiguous()):
                dest = None
            t = merge_tensor(recipe, plan, sources, out.source_name, ref.site(out.source_name), out=dest,
                             device=device)
            if out.scale != 1.0:
                t.mul_(out.scale)
        else:  # an input tensor (maybe resident): never modify it
            t = sources.get(out.source, out.source_name, device)
            if out.scale != 1.0:
                t = t.float() * out.scale
        yield out.name, t


# ---------------------------------------------------------------------- in-place materialisation
def build_model(sources: Sources, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                devices: list[str] | None = None, split: bool = False):
    """Instantiate the reference model's architecture once (weights are filled per candidate):
    on ``device`` (default: the sources'), or split over ``devices`` (:mod:`evomerge.merge.devices`)."""
    from evomerge.merge.devices import build_model as build

    device = torch.device(device) if device is not None else sources.device
    return build(sources.reference, devices or [str(device)], dtype, trust_remote_code, split=split)


def apply_in_place(model: torch.nn.Module, recipe: Recipe, sources: Sources) -> dict[str, float]:
    """Overwrite ``model``'s parameters with the merge, tensor by tensor. Returns timings.

    Layer-flow recipes resize the model's block list first (spare blocks are kept for reuse).
    """
    t0 = time.perf_counter()
    layout = validate(recipe, sources)
    n_blocks = lf.output_num_blocks(recipe, sources)
    lf.resize_blocks(model, n_blocks, lf.layer_types_for(recipe, sources, n_blocks))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        targets = {n: p.data for n, p in params.items()}
        for name, tensor in merged_tensors(recipe, sources, layout, targets):
            target = params.get(name)
            if target is None:
                target = buffers.get(name)
            if target is None:
                if tied and "lm_head" in name:
                    continue
                raise ModelError(f"the resident model has no parameter {name}")
            if tensor is not targets.get(name):
                target.copy_(tensor)
    return {"merge_s": time.perf_counter() - t0}
