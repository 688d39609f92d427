"""A merge recipe: plain, versioned, hashable data that fully determines a merged model.

The recipe is the unit of exchange between search, workers, the run store, reports and export.
Its shape follows mergekit's configuration where mergekit has one (``merge_method``,
``base_model``, ``models[].parameters``, scalar / gradient / filtered parameter values) and adds
two things mergekit lacks:

* :class:`GroupValues` — one value per *layer group* (``embed``, each block, ``head``), the
  genome of parameter-space search;
* :class:`LayerFlow` — an ordered list of blocks ``(model, layer, scale)`` that defines the
  merged network's block sequence (data-flow-space search). A slot's model may be ``"merge"``,
  the recipe's own parameter-space merge, so PS, DFS and hybrid merges are one recipe type.

Parameter values are resolved per tensor exactly like mergekit (0.1.5, measured): a list of
numbers is a gradient interpolated at ``t`` where ``t = i / (L - 1)`` for block ``i`` and
``t = 0`` for every tensor outside the blocks (embeddings, final norm and head alike — use
:class:`GroupValues` to give the head its own value); a list of ``{filter, value}`` picks the first entry whose
``filter`` is a substring of the tensor name (no filter matches everything).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.io import atomic_write_text, load_yaml, parse_model

RECIPE_VERSION = 1
MERGED = "merge"  # layer-flow source name for the recipe's own parameter-space merge


def reference_alias(models: Mapping[str, Any]) -> str:
    """The alias of the model a set of inputs (alias → model, base first as
    :meth:`Recipe.model_paths` orders them) follows for its layout and tokenizer: ``base`` when
    there is one, else the first input. The one home of this rule (workers, memory plan, sources)."""
    if not models:
        raise ConfigError("a merge needs at least one input model")
    return "base" if "base" in models else next(iter(models))


Scalar = Union[float, int, bool, str]


class GroupValues(BaseModel):
    """One value per layer group. ``layers`` has one entry per block, or is a gradient."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    embed: float
    layers: list[float] = Field(min_length=1)
    head: float


class FilteredValue(BaseModel):
    """A value that applies to tensors whose name contains ``filter`` (mergekit's shape)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    filter: str | None = None
    value: Union[Scalar, list[float], GroupValues]


ParamValue = Union[Scalar, list[float], GroupValues, list[FilteredValue]]


def _finite_parameters(params: Any) -> Any:
    """Refuse NaN / ±inf anywhere in a parameters mapping: they would merge into NaN weights."""
    def walk(v: Any, where: str) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where} = {v}: parameter values must be finite numbers")
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{where}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
    if isinstance(params, dict):
        for name, value in params.items():
            walk(value, str(name))
    return params


class InputModel(BaseModel):
    """An expert (or any input model) and its per-model parameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    name: str | None = None  # alias used by layer flows; default: the directory's name
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("parameters", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        return _finite_parameters(v)

    @property
    def alias(self) -> str:
        return self.name or Path(self.model).name


class LayerSlot(BaseModel):
    """One block of a layer flow: block ``layer`` of ``model``, its input scaled by ``scale``.

    ``tensor_scale`` multiplies the block's weights themselves (mergekit's passthrough ``scale``,
    e.g. 0 on ``o_proj``/``down_proj`` to make a repeated block an identity): a number, or a list
    of ``{filter, value}`` matched against the source tensor names (no match: 1). Unset (``None``)
    means 1, and 1 is stored as unset, so recipes without it keep their hash.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0
    tensor_scale: Union[float, list["FilteredValue"], None] = None

    @field_validator("tensor_scale")
    @classmethod
    def _numbers(cls, v):
        if isinstance(v, list) and any(isinstance(c.value, (bool, str, list, GroupValues)) for c in v):
            raise ValueError("tensor_scale filter values must be numbers")
        return None if v == 1.0 or v == [] else v

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"layer-flow scale must be positive and finite, got {v}")
        return v


class LayerFlow(BaseModel):
    """The merged network's blocks in order; embeddings and head come from ``embed_from``.

    ``scale`` multiplies the residual stream entering a block. Because every block reads the
    stream through an RMSNorm and the final norm removes a global scale, this is folded into
    the output projections of that block and all later ones on export (see
    :mod:`evomerge.merge.layer_flow`), so the exported model is a plain ``transformers`` model.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    embed_from: str | None = None  # default: "merge" when the recipe merges, else the base
    head_from: str | None = None  # final norm and lm_head; default: embed_from
    slots: list[LayerSlot] = Field(min_length=1)


class Recipe(BaseModel):
    """A complete merge: inputs, operator, parameters, optional layer flow."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    version: int = RECIPE_VERSION
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    layer_flow: LayerFlow | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    # "base", "union", or a model alias / path: the merged vocabulary (evomerge.merge.vocab);
    # unset: the base's tokenizer files, no re-indexing
    tokenizer_source: str | None = None
    chat_template: str | None = None  # "auto", a built-in name, a model alias or a Jinja template
    seed: int = 0  # mixed with the recipe hash to seed random operators (DARE, DELLA)

    @field_validator("parameters", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        return _finite_parameters(v)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is newer than this evomerge ({RECIPE_VERSION})")
        return v

    @model_validator(mode="after")
    def _check_inputs(self) -> "Recipe":
        if not self.models and self.base_model is None:
            raise ValueError("a recipe needs `models` (and usually `base_model`)")
        aliases = [m.alias for m in self.models]
        dupes = {a for a in aliases if aliases.count(a) > 1}
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {sorted(dupes)}; set `name:`")
        if self.layer_flow is not None:
            known = set(self.source_names())
            for i, slot in enumerate(self.layer_flow.slots):
                if slot.model not in known:
                    raise ValueError(
                        f"layer_flow.slots[{i}].model {slot.model!r} is not one of {sorted(known)}"
                    )
            for key in ("embed_from", "head_from"):
                value = getattr(self.layer_flow, key)
                if value is not None and value not in known:
                    raise ValueError(f"layer_flow.{key} {value!r} is not one of {sorted(known)}")
        return self

    # ------------------------------------------------------------------ names and sources
    def source_names(self) -> list[str]:
        """Names a layer flow may use: ``base``, each model's alias, and ``merge``."""
        names = [m.alias for m in self.models]
        if self.base_model is not None:
            names.insert(0, "base")
        if self.merge_method != "passthrough":
            names.append(MERGED)
        return names

    def model_paths(self) -> dict[str, str]:
        """Alias → directory for every input (``base`` for the base model)."""
        paths = {m.alias: m.model for m in self.models}
        if self.base_model is not None:
            paths = {"base": self.base_model, **paths}
        return paths

    # ------------------------------------------------------------------ identity
    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)

    def hash(self) -> str:
        """Content hash: same recipe ⇒ same hash ⇒ same weights ⇒ evaluated once."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def mask_key(self, family: str) -> str:
        """Identity of a random operator's masks (with ``seed`` and the tensor name, which the
        engine mixes in): the mask ``family`` (the operator's sparsification) and the models'
        aliases in order — not paths (moving the models keeps the masks), and not weights,
        densities or any other coefficient, so that every candidate of a search shares its masks
        (common random numbers, docs/operators.md *Randomness*)."""
        data = {"family": family, "models": [m.alias for m in self.models]}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ I/O
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        return parse_model(cls, data, where)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(load_yaml(path), where=str(path))


# ---------------------------------------------------------------------- parameter resolution
def interpolate(values: list[float], t: float) -> float:
    """mergekit's gradient: piecewise-linear through ``values`` spread evenly over t ∈ [0, 1]."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


class TensorSite(BaseModel):
    """Where a tensor sits: its name, its layer group and its gradient position ``t``."""

    model_config = ConfigDict(frozen=True)
    name: str
    group: str  # "embed", "layers.<i>", "head"
    block: int | None = None
    num_blocks: int

    @property
    def t(self) -> float:
        if self.block is None:  # embeddings, final norm, head: mergekit reads t = 0
            return 0.0
        return self.block / (self.num_blocks - 1) if self.num_blocks > 1 else 1.0


def resolve(value: ParamValue | None, site: TensorSite) -> Any:
    """The value of one parameter for one tensor (``None`` when no filter matches)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, GroupValues):
        if site.group == "embed":
            return value.embed
        if site.group == "head":
            return value.head
        if len(value.layers) == site.num_blocks:
            return value.layers[site.block]
        return interpolate(value.layers, site.t)
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return interpolate([float(v) for v in value], site.t)
        for cond in value:
            if cond.filter in (None, "*") or cond.filter in site.name:
                return resolve(cond.value, site)
        return None
    raise ConfigError(f"unexpected parameter value {value!r}")
