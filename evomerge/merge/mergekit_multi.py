"""Merge files that are not (only) evomerge recipes: format detection, and mergekit's
multi-document "mega" files (several named merges, later ones using earlier ones by name).

Detection (:func:`read_merge_file`), so that ``evomerge merge`` takes either format:

* several YAML documents → a mergekit multi-merge;
* a mapping with an evomerge-only key (``version``, ``layer_flow``, ``seed``) → a recipe;
* a mapping with a mergekit-only key (``slices``, ``modules``, ``out_dtype``, ``tokenizer``,
  ``name``) → a mergekit config;
* otherwise (the shared ``models:`` shape) the file is read both ways: if only one reading is
  valid, or both give the same recipe, that recipe is used; if they differ (the base listed
  among ``models``, ``linear`` with a ``base_model``, which mergekit adds as an input, a
  tokenizer given by path, parameters the method ignores) the mergekit reading wins, with a
  note saying so: evomerge writes every recipe with ``version:``, so a file without it that
  only makes sense one way was almost surely written for mergekit. ``version: 1`` forces the
  recipe reading.

Multi-merges follow ``mergekit-multi``: each document may have a ``name``; a model reference
equal to an earlier merge's name means that merge's output. Merges run in dependency order;
the one unnamed document (else the last one) is the final model written to the output
directory, the named ones go to ``<out>.merges/<name>`` (kept and reused by later runs, as
mergekit-multi does, unless ``--force``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from evomerge.errors import ConfigError
from evomerge.io import load_yaml_documents
from evomerge.merge.mergekit import recipe_from_mergekit
from evomerge.recipe import Recipe

_RECIPE_ONLY = {"version", "layer_flow", "seed"}
_MERGEKIT_ONLY = {"slices", "modules", "out_dtype", "tokenizer", "name"}


@dataclass(frozen=True)
class MergeFile:
    kind: str  # "recipe" or "mergekit"
    recipe: Recipe | None = None  # kind == "recipe"
    documents: tuple[dict, ...] = ()  # kind == "mergekit"
    note: str | None = None  # why an ambiguous file was read as mergekit


def read_merge_file(path: str | Path) -> MergeFile:
    """Read ``path`` as an evomerge recipe or a mergekit config (see the module docstring)."""
    p = Path(path)
    docs = load_yaml_documents(p)
    if not docs:
        raise ConfigError(f"{p}: the file is empty")
    if len(docs) > 1:
        return MergeFile("mergekit", documents=tuple(docs))
    doc = docs[0]
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(doc).__name__}")
    if _RECIPE_ONLY & set(doc):
        return MergeFile("recipe", recipe=Recipe.from_dict(doc, str(p)))
    if _MERGEKIT_ONLY & set(doc):
        return MergeFile("mergekit", documents=(doc,))
    try:
        as_recipe = Recipe.from_dict(doc, str(p))
    except ConfigError as e:
        as_recipe, recipe_error = None, e
    try:
        as_mergekit = recipe_from_mergekit(doc, where=str(p), warn=lambda m: None)
    except ConfigError as e:
        as_mergekit, mergekit_error = None, e
    if as_recipe is None and as_mergekit is None:
        raise ConfigError(f"neither an evomerge recipe ({recipe_error}) nor a mergekit config ({mergekit_error})")
    if as_recipe is None:
        return MergeFile("mergekit", documents=(doc,))
    if as_mergekit is not None and as_mergekit != as_recipe:
        return MergeFile("mergekit", documents=(doc,), note=(
            f"{p}: read as a mergekit config (it means something else as an evomerge recipe; add "
            "`version: 1` to read it as a recipe)"))
    return MergeFile("recipe", recipe=as_recipe)


@dataclass(frozen=True)
class PlannedMerge:
    name: str | None
    out: Path
    final: bool
    config: dict  # the mergekit document with earlier merges' names replaced by their outputs


def plan_documents(documents: tuple[dict, ...] | list[dict], out: str | Path, where: str) -> list[PlannedMerge]:
    """The merges of a (multi-)document mergekit file in dependency order (see module docstring)."""
    out = Path(out)
    named: dict[str, dict] = {}
    unnamed = []
    for i, d in enumerate(documents):
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: document {i + 1} is not a mapping")
        name = d.get("name")
        if name is None:
            unnamed.append(d)
        elif not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"{where}: document {i + 1}: name {name!r} must be a plain, non-empty string")
        elif name in named:
            raise ConfigError(f"{where}: two merges are named {name!r}")
        else:
            named[name] = d
    if len(unnamed) > 1:
        raise ConfigError(f"{where}: {len(unnamed)} documents have no `name`; only the final merge may omit it")
    final_name = None if unnamed else list(named)[-1]
    parts = out.parent / f"{out.name}.merges"
    target = {n: (out if n == final_name else parts / n) for n in named}

    def deps(doc: dict) -> list[str]:
        return [r for r in _refs(doc) if r in named]

    order: list[str | None] = []
    state: dict[str, str] = {}

    def visit(n: str, chain: tuple[str, ...]) -> None:
        if state.get(n) == "done":
            return
        if n in chain:
            raise ConfigError(f"{where}: merges depend on each other in a cycle: {' → '.join(chain + (n,))}")
        for d in deps(named[n]):
            visit(d, chain + (n,))
        state[n] = "done"
        order.append(n)

    for n in named:
        visit(n, ())
    if unnamed:
        for d in deps(unnamed[0]):
            visit(d, ())
        order.append(None)
    merges = []
    for n in order:
        doc = unnamed[0] if n is None else named[n]
        doc = {k: v for k, v in doc.items() if k != "name"}
        merges.append(PlannedMerge(name=n, out=out if n is None else target[n], final=(n == final_name),
                                   config=_substitute(doc, {k: str(v) for k, v in target.items()})))
    return merges


_REF_KEYS = {"model", "base_model", "tokenizer_source", "source"}


def _refs(obj: Any) -> Iterator[str]:
    """Every model reference string in a mergekit document (``x+lora`` counts as ``x``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _REF_KEYS and isinstance(v, str):
                yield v.split("+")[0]
            elif k == "model" and isinstance(v, dict) and isinstance(v.get("path"), str):
                yield v["path"]
            if k not in ("parameters",):
                yield from _refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _refs(v)


def _substitute(obj: Any, paths: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in _REF_KEYS and isinstance(v, str):
                head, *lora = v.split("+")
                out[k] = "+".join([paths.get(head, head), *lora])
            elif k == "model" and isinstance(v, dict) and isinstance(v.get("path"), str):
                out[k] = {**v, "path": paths.get(v["path"], v["path"])}
            elif k == "parameters":
                out[k] = v
            else:
                out[k] = _substitute(v, paths)
        return out
    if isinstance(obj, list):
        return [_substitute(v, paths) for v in obj]
    return obj
