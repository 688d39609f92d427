"""Layer flows: the merged network's block sequence, and how its input scales are stored.

A slot ``(model, layer, scale)`` places block ``layer`` of ``model`` at the next position and
multiplies the residual stream entering it by ``scale``. In a pre-norm transformer every block
reads the stream through a norm (RMSNorm or LayerNorm: scale-invariant up to ε) and the final
norm removes a global scale, so multiplying the stream by ``s_j`` before block ``j`` is
equivalent to dividing the output projections (attention-out and MLP-out: ``o_proj`` /
``down_proj`` in Llama, per family in :mod:`evomerge.architecture`, which also says which
families are pre-norm) of block ``j`` and every later block by the cumulative scale
``S_j = s_0 · … · s_j``. evomerge stores the scaling that way: folded into those weights. The
merged model is therefore a plain ``transformers`` model with a new ``num_hidden_layers`` — no
custom code, and nothing a plain load could silently drop.
Scales must be positive (a negative scale would flip the stream, which no norm undoes).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from evomerge.architecture import FAMILIES, TensorRoles
from evomerge.errors import ConfigError
from evomerge.merge.sources import OutputTensor, Sources
from evomerge.models import ModelDir
from evomerge.recipe import MERGED, Recipe


def embed_source(recipe: Recipe) -> str:
    flow = recipe.layer_flow
    if flow is not None and flow.embed_from is not None:
        return flow.embed_from
    if recipe.merge_method != "passthrough":
        return MERGED
    return "base" if recipe.base_model is not None else recipe.models[0].alias


def head_source(recipe: Recipe) -> str:
    flow = recipe.layer_flow
    if flow is not None and flow.head_from is not None:
        return flow.head_from
    return embed_source(recipe)


def _dir_for(sources: Sources, alias: str) -> ModelDir:
    return sources.reference if alias == MERGED else sources.dirs[alias]


@lru_cache(maxsize=64)
def _blocks(d: ModelDir) -> tuple[tuple[str, ...], dict[int, tuple[str, ...]]]:
    """(non-block tensor names, block index → tensor names), in file order."""
    outside: list[str] = []
    blocks: dict[int, list[str]] = {}
    for n in d.tensor_names:
        b = d.roles.block_index(n)
        if b is None:
            outside.append(n)
        else:
            blocks.setdefault(b, []).append(n)
    return tuple(outside), {b: tuple(v) for b, v in blocks.items()}


def output_num_blocks(recipe: Recipe, sources: Sources) -> int:
    if recipe.layer_flow is None:
        return sources.reference.num_blocks
    return len(recipe.layer_flow.slots)


def layout(recipe: Recipe, sources: Sources) -> list[OutputTensor]:
    """Output tensors of a layer-flow merge, with cumulative inverse scales folded in."""
    flow = recipe.layer_flow
    assert flow is not None
    scaled = any(s.scale != 1.0 for s in flow.slots)
    ref = sources.reference
    if scaled and not ref.roles.scale_foldable:
        foldable = sorted(t for f in FAMILIES if f.scale_foldable for t in f.model_types)
        raise ConfigError(
            f"layer_flow scales need a pre-norm architecture ({', '.join(foldable)}); "
            f"{ref.model_type} is not known to be one — use scale 1.0 everywhere"
        )
    embed_src, head_src = embed_source(recipe), head_source(recipe)
    outside, _ = _blocks(_dir_for(sources, embed_src))
    out: list[OutputTensor] = []
    embed = [n for n in outside if ref.roles.group_of(n) == "embed"]
    head = [n for n in _blocks(_dir_for(sources, head_src))[0] if ref.roles.group_of(n) != "embed"]
    out += [OutputTensor(n, embed_src, n) for n in embed]
    cumulative = 1.0
    for j, slot in enumerate(flow.slots):
        d = _dir_for(sources, slot.model)
        _, blocks = _blocks(d)
        if slot.layer not in blocks:
            raise ConfigError(
                f"layer_flow.slots[{j}].layer = {slot.layer} is out of range: {slot.model} has "
                f"{d.num_blocks} blocks (0–{d.num_blocks - 1})"
            )
        cumulative *= slot.scale
        for n in blocks[slot.layer]:
            fold = 1.0 / cumulative if d.roles.is_output_projection(n) else 1.0
            fold *= slot_tensor_scale(slot.tensor_scale, n)
            out.append(OutputTensor(d.roles.with_block_index(n, j), slot.model, n, fold))
    out += [OutputTensor(n, head_src, n) for n in head]
    return out


def slot_tensor_scale(value, name: str) -> float:
    """A slot's ``tensor_scale`` for source tensor ``name`` (first matching filter; else 1)."""
    if value is None:
        return 1.0
    if isinstance(value, (int, float)):
        return float(value)
    for cond in value:
        if cond.filter in (None, "*") or cond.filter in name:
            return float(cond.value)
    return 1.0


def layer_types_for(recipe: Recipe, sources: Sources, n_blocks: int) -> list[str] | None:
    """Per-block ``layer_types`` (sliding vs full attention) for configs that have them."""
    types = sources.reference.config.get("layer_types")
    if not types:
        return None
    if recipe.layer_flow is None:
        return list(types)[:n_blocks]
    result = []
    for slot in recipe.layer_flow.slots:
        src_types = _dir_for(sources, slot.model).config.get("layer_types") or types
        result.append(src_types[slot.layer])
    return result


def output_config(recipe: Recipe, sources: Sources) -> dict:
    """``config.json`` of the merged model."""
    cfg = dict(sources.reference.config)
    n = output_num_blocks(recipe, sources)
    cfg["num_hidden_layers"] = n
    types = layer_types_for(recipe, sources, n)
    if types is not None:
        cfg["layer_types"] = types
    if recipe.layer_flow is not None and "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], n)
    return cfg


def _block_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    roles = TensorRoles.for_config(model.config)
    for name, _ in model.named_parameters():
        path = roles.block_path(name)
        if path is not None:
            module = model.get_submodule(path)
            if isinstance(module, torch.nn.ModuleList):
                return module
    raise ConfigError(f"cannot find the block list of {type(model).__name__}")


def resize_blocks(model: torch.nn.Module, n: int, layer_types: list[str] | None = None) -> None:
    """Make ``model`` run exactly ``n`` blocks, keeping spare blocks for later candidates.

    ``transformers`` runs ``layers[: config.num_hidden_layers]``, so shrinking only lowers the
    count; growing deep-copies an existing block once. Each block's ``layer_idx`` is its position
    (the KV cache is indexed by it).
    """
    import copy

    blocks = _block_list(model)
    while len(blocks) < n:
        blocks.append(copy.deepcopy(blocks[-1]))
    for i, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    cfg = model.config
    cfg.num_hidden_layers = n
    if layer_types is not None and hasattr(cfg, "layer_types"):
        cfg.layer_types = list(layer_types)
    elif getattr(cfg, "layer_types", None) is not None and len(cfg.layer_types) != n:
        cfg.layer_types = (list(cfg.layer_types) + [cfg.layer_types[-1]] * n)[:n]
