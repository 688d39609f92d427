"""A recipe as pictures: per-layer-group parameters as a grid, the layer flow as a sequence.

Values are resolved with the merge engine's own rules (:func:`evomerge.recipe.resolve`), so the
heat map shows exactly the number each tensor group is merged with, whether the recipe wrote a
scalar, a gradient or one value per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.recipe import FilteredValue, Recipe, TensorSite, resolve


@dataclass
class ParamGrid:
    """rows × columns of numbers; columns are ``embed``, ``L0`` … ``L{n-1}``, ``head``."""

    rows: list[str]
    columns: list[str]
    z: list[list[float | None]]


def _sites(num_blocks: int) -> list[TensorSite]:
    sites = [TensorSite(name="embed", group="embed", num_blocks=num_blocks)]
    sites += [TensorSite(name=f"layers.{i}", group=f"layers.{i}", block=i, num_blocks=num_blocks)
              for i in range(num_blocks)]
    sites.append(TensorSite(name="head", group="head", num_blocks=num_blocks))
    return sites


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _rows(label: str, value: Any, sites: list[TensorSite]) -> list[tuple[str, list[float | None]]]:
    """One row per parameter (one per filter for filtered values); non-numeric ones are skipped."""
    if isinstance(value, list) and value and isinstance(value[0], FilteredValue):
        out = []
        for cond in value:
            tag = cond.filter if cond.filter not in (None, "*") else "*"
            out += _rows(f"{label} [{tag}]", cond.value, sites)
        return out
    row = [_numeric(resolve(value, s)) for s in sites]
    return [(label, row)] if any(v is not None for v in row) else []


def _depth(recipe: Recipe) -> int | None:
    """Blocks implied by per-group values (when every group is spelled out)."""
    for value in [*recipe.parameters.values(), *(v for m in recipe.models for v in m.parameters.values())]:
        if hasattr(value, "layers"):
            return len(value.layers)
    return None


def param_grid(recipe: Recipe, num_blocks: int | None) -> ParamGrid | None:
    """The per-layer-group value of every numeric parameter, per input model; None if there are none."""
    n = num_blocks or _depth(recipe) or 1
    sites = _sites(n)
    rows: list[tuple[str, list[float | None]]] = []
    for m in recipe.models:
        for pname, value in m.parameters.items():
            rows += _rows(f"{m.alias} · {pname}", value, sites)
    for pname, value in recipe.parameters.items():
        rows += _rows(f"all · {pname}", value, sites)
    if not rows:
        return None
    return ParamGrid([r for r, _ in rows], ["embed", *(f"L{i}" for i in range(n)), "head"],
                     [vals for _, vals in rows])


def layer_flow(recipe: Recipe) -> dict | None:
    """The block sequence of a layer-flow recipe: embeddings source, then (model, layer, scale)."""
    if recipe.layer_flow is None:
        return None
    embed = recipe.layer_flow.embed_from or ("merge" if recipe.merge_method != "passthrough" else "base")
    return {"embed_from": embed,
            "slots": [{"model": s.model, "layer": s.layer, "scale": s.scale} for s in recipe.layer_flow.slots]}


def summary(recipe: Recipe) -> str:
    """One line: operator, inputs, layer-flow length."""
    parts = [recipe.merge_method, f"{len(recipe.models)} model(s)"]
    if recipe.layer_flow is not None:
        parts.append(f"layer flow of {len(recipe.layer_flow.slots)} blocks")
    return ", ".join(parts)
