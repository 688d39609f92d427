"""Recipe → weights, one tensor at a time.

:func:`merged_tensors` is the single place where a recipe becomes tensors; both ways of
materialising a merge consume it:

* :func:`apply_in_place` overwrites the parameters of an already-instantiated model (a search
  worker does this thousands of times: no disk, no re-instantiation, no second copy of the model);
* :func:`evomerge.merge.export.export_model` streams the tensors into a Hugging Face directory.

Inputs come from :class:`~evomerge.merge.sources.Sources`: memory-mapped safetensors (export), or
placed once for a search worker (:mod:`evomerge.merge.placement`: resident on its device, pinned
host memory, or files read per candidate). Each tensor is merged on the device of its target
parameter, so a model split over several GPUs is merged where it lives.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from evomerge.architecture import ParameterMap
from evomerge.errors import ConfigError, ModelError
from evomerge.merge import layer_flow as lf
from evomerge.merge.methods import Operator, get_operator
from evomerge.merge.methods.sparsify import converted_from
from evomerge.merge.sources import OutputTensor, Sources
from evomerge.merge.vocab import vocabulary_of
from evomerge.recipe import MERGED, Recipe, TensorSite, resolve


# ---------------------------------------------------------------------- parameter resolution
@dataclass(frozen=True)
class _Plan:
    op: Operator
    seed_key: str  # random operators: their mask family (Recipe.mask_key), seeding the generator


def _plan(recipe: Recipe) -> _Plan:
    op = get_operator(recipe.merge_method)
    n = len(recipe.models)
    if n < op.min_models or (op.max_models is not None and n > op.max_models):
        want = f"{op.min_models}" if op.max_models == op.min_models else (
            f"at least {op.min_models}" if op.max_models is None else f"{op.min_models}–{op.max_models}")
        raise ConfigError(f"merge_method {op.name} takes {want} models, the recipe lists {n}")
    if op.needs_base and recipe.base_model is None:
        raise ConfigError(f"merge_method {op.name} needs `base_model`")
    return _Plan(op=op, seed_key=recipe.mask_key(op.sparsify or op.name) if op.random else "")


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
    """The generator seed of a random operator for tensor ``name``: a function of the mask family
    (``seed_key``), the recipe's ``seed`` and the tensor name only, so that recipes differing in
    coefficients share their masks (their keep sets are nested in the density)."""
    h = hashlib.sha256(f"{seed_key}:{recipe_seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _uses_base(recipe: Recipe, op: Operator) -> bool:
    return op.needs_base or (op.optional_base and recipe.base_model is not None)


def _merge_inputs(recipe: Recipe, plan: _Plan, sources: Sources, name: str) -> list[str]:
    """The aliases a merged tensor reads, in order (the base first when the operator uses it)."""
    if name not in sources.reference:
        raise ModelError(f"{sources.reference.path}: no tensor named {name}")
    if not sources.reference.dtype(name).is_floating_point:  # copied from one model, not merged
        return ["base" if "base" in sources.dirs else recipe.models[0].alias]
    return (["base"] if _uses_base(recipe, plan.op) else []) + [m.alias for m in recipe.models]


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
    if op.wants_site:
        options["site"] = site
    raw = [sources.get(a, name, device) for a in aliases]
    floats = [t.float() for t in raw]
    base, tensors = (floats[0], floats[1:]) if _uses_base(recipe, op) else (None, floats)
    gen = None
    if op.random:
        gen = torch.Generator(device=tensors[0].device)
        gen.manual_seed(_seed(plan.seed_key, recipe.seed, name))
    with converted_from(list(zip(floats, raw))):  # cached orders follow the resident tensors
        return op.fn(base, tensors, params, options, gen, out=out)


# ---------------------------------------------------------------------- the merge as a stream
def output_layout(recipe: Recipe, sources: Sources) -> list[OutputTensor]:
    """The merged model's tensors in file order: embeddings, blocks, head."""
    ref = sources.reference
    if recipe.layer_flow is None:
        copy = recipe.merge_method == "passthrough" and not recipe.parameters and not any(
            m.parameters for m in recipe.models)  # a passthrough with a `scale` runs the operator
        src = _first_alias(recipe) if copy else MERGED
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
                   targets: dict[str, torch.Tensor] | None = None,
                   devices: dict[str, torch.device] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the merged model, one at a time (float32
    for floating tensors). Merged tensors are computed straight into ``targets[name]`` when that
    is a float32 contiguous tensor (then the yielded tensor *is* the target). Each tensor is
    merged on the device of its target, else ``devices[name]``, else the sources' device (a
    model split over several GPUs is merged where it lives)."""
    layout = validate(recipe, sources) if layout is None else layout
    plan = _plan(recipe)
    ref = sources.reference
    targets = targets or {}
    devices = devices or {}
    where = [targets[o.name].device if o.name in targets else devices.get(o.name, sources.device) for o in layout]
    sources.expect([(a, o.source_name, dev) for o, dev in zip(layout, where)
                    for a in (_merge_inputs(recipe, plan, sources, o.source_name) if o.source == MERGED
                              else [o.source])])
    for out, device in zip(layout, where):
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
    """Instantiate the reference model's architecture once, empty (weights are filled per
    candidate): on ``device`` (default: the sources'), or split over ``devices``
    (:mod:`evomerge.merge.devices`); with the output vocabulary's rows when the merge re-indexes
    the vocabulary (``tokenizer_source``)."""
    from evomerge.merge.devices import build_model as build

    device = torch.device(device) if device is not None else sources.device
    vocab = vocabulary_of(sources)
    return build(sources.reference, devices or [str(device)], dtype, trust_remote_code, split=split,
                 vocab_size=vocab.size if vocab is not None else None)


def apply_in_place(model: torch.nn.Module, recipe: Recipe, sources: Sources) -> dict[str, float]:
    """Overwrite ``model``'s parameters with the merge, tensor by tensor. Returns timings.

    Layer-flow recipes resize the model's block list first (spare blocks are kept for reuse).
    Merged tensors carry checkpoint names; :class:`~evomerge.architecture.ParameterMap` (built from
    ``transformers``' own loading rules) says which parameter each one is. A tensor that
    ``transformers`` fuses with others (a MoE layer's per-expert weights → one 3-D parameter) is
    held until its group is complete, then fused by ``transformers``' converter and copied in:
    the extra memory is one fused parameter, never a model.
    """
    t0 = time.perf_counter()
    layout = validate(recipe, sources)
    n_blocks = lf.output_num_blocks(recipe, sources)
    lf.resize_blocks(model, n_blocks, lf.layer_types_for(recipe, sources, n_blocks))
    params = dict(model.named_parameters(remove_duplicate=False))
    known = {**dict(model.named_buffers()), **params}
    pmap = _parameter_map(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    where = {o.name: pmap.target(o.name, known) for o in layout}
    group_size: dict[str, int] = {}
    for param, pattern in where.values():
        if pattern is not None:
            group_size[param] = group_size.get(param, 0) + 1
    pending: dict[str, list[tuple[str, str, torch.Tensor]]] = {}
    with torch.no_grad():
        # merged straight into the parameter where the checkpoint tensor is the whole parameter
        targets = {n: params[p].data for n, (p, pat) in where.items() if pat is None and p in params}
        devices = {n: known[p].device for n, (p, _) in where.items() if p in known}  # fused parts too
        for name, tensor in merged_tensors(recipe, sources, layout, targets, devices):
            param, pattern = where[name]
            if pattern is not None:
                parts = pending.setdefault(param, [])
                parts.append((name, pattern, tensor))
                if len(parts) < group_size[param]:
                    continue
                tensor = pmap.assemble(param, pending.pop(param))
            target = known.get(param)
            if target is None:
                if tied and sources.reference.roles.role(name).kind == "head":
                    continue
                raise ModelError(f"the resident model has no parameter {param} (checkpoint tensor {name})")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelError(f"{param}: the merge gives shape {list(tensor.shape)}, the resident model "
                                 f"has {list(target.shape)}")
            if tensor is not targets.get(name):
                target.copy_(tensor)
    return {"merge_s": time.perf_counter() - t0}


_PARAMETER_MAPS: "weakref.WeakKeyDictionary[torch.nn.Module, ParameterMap]" = weakref.WeakKeyDictionary()


def _parameter_map(model: torch.nn.Module) -> ParameterMap:
    pmap = _PARAMETER_MAPS.get(model)
    if pmap is None:
        pmap = _PARAMETER_MAPS[model] = ParameterMap.for_model(model)
    return pmap
